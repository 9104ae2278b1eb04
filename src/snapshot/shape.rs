//! The shape of a snapshot: every column of a table has the table's length, every CSR
//! start column has one entry more, starts at 0, never decreases and ends at its
//! list's length, and every row reference lies inside its table (or is `NONE` where
//! the field allows it). One macro checks the native snapshot (the builder asserts it)
//! and the archived one (the reader refuses a file that fails it), so a reader may
//! index the archived columns by the rows the file itself holds.

use super::{ArchivedSnapshot, Snapshot, NONE};

/// A row column entry, native or archived.
trait RowValue {
    fn value(&self) -> u32;
}

impl RowValue for u32 {
    fn value(&self) -> u32 {
        *self
    }
}

impl RowValue for rkyv::rend::u32_le {
    fn value(&self) -> u32 {
        self.to_native()
    }
}

/// Every named length equals `rows`.
fn same_length(rows: usize, columns: &[(&str, usize)]) -> Result<(), String> {
    match columns.iter().find(|(_, length)| *length != rows) {
        Some((name, length)) => Err(format!("column {name} holds {length} entries for a table of {rows} rows")),
        None => Ok(()),
    }
}

/// A CSR start column: `rows + 1` entries, from 0, never decreasing, ending at `items`.
fn csr_shape<'a, T: RowValue + 'a>(
    name: &str,
    starts: impl ExactSizeIterator<Item = &'a T>,
    rows: usize,
    items: usize,
) -> Result<(), String> {
    if starts.len() != rows + 1 {
        return Err(format!(
            "column {name} holds {} entries for a table of {rows} rows (needs rows + 1)",
            starts.len()
        ));
    }
    let mut previous = 0u64;
    for (row, start) in starts.enumerate() {
        let start = start.value() as u64;
        if (row == 0 && start != 0) || start < previous || start > items as u64 {
            return Err(format!("column {name} entry {row} ({start}) is out of order or past {items} items"));
        }
        previous = start;
    }
    if previous != items as u64 {
        return Err(format!("column {name} ends at {previous}, its list holds {items} items"));
    }
    Ok(())
}

/// A row reference inside a table of `rows` rows (or `NONE` when allowed).
fn in_table(name: &str, value: &impl RowValue, rows: usize, none_allowed: bool) -> Result<(), String> {
    let value = value.value();
    if (value as usize) < rows || (none_allowed && value == NONE) {
        Ok(())
    } else {
        Err(format!("{name} refers to row {value}, past a table of {rows} rows"))
    }
}

macro_rules! check_shape_of {
    ($snapshot:ident) => {{
        let nodes = &$snapshot.nodes;
        let locality = &$snapshot.locality;
        let node_rows = nodes.name.len();
        same_length(
            node_rows,
            &[
                ("nodes.status", nodes.status.len()),
                ("nodes.status_since_ms", nodes.status_since_ms.len()),
                ("nodes.live", nodes.live.len()),
                ("nodes.eligible", nodes.eligible.len()),
                ("nodes.last_heartbeat_ms", nodes.last_heartbeat_ms.len()),
                ("nodes.incarnation", nodes.incarnation.len()),
                ("nodes.load_permille", nodes.load_permille.len()),
                ("nodes.hot", nodes.hot.len()),
                ("nodes.avoid", nodes.avoid.len()),
                ("nodes.cordoned", nodes.cordoned.len()),
                ("nodes.draining", nodes.draining.len()),
                ("nodes.backpressure", nodes.backpressure.len()),
                ("nodes.maintenance", nodes.maintenance.len()),
                ("nodes.maintenance_since_ms", nodes.maintenance_since_ms.len()),
                ("nodes.drain_unsafe_copies", nodes.drain_unsafe_copies.len()),
                ("nodes.drain_moving_copies", nodes.drain_moving_copies.len()),
                ("nodes.drain_daemons_left", nodes.drain_daemons_left.len()),
                ("nodes.drain_unsafe_bytes", nodes.drain_unsafe_bytes.len()),
                ("nodes.drain_eta_ms", nodes.drain_eta_ms.len()),
                ("nodes.drain_deadline_ms", nodes.drain_deadline_ms.len()),
                ("nodes.capability_version", nodes.capability_version.len()),
                ("nodes.commitment_position", nodes.commitment_position.len()),
                ("nodes.commitment_hash", nodes.commitment_hash.len()),
                ("nodes.needs_position", nodes.needs_position.len()),
                ("nodes.commitment_disagrees", nodes.commitment_disagrees.len()),
                ("nodes.capability_version_at_enter", nodes.capability_version_at_enter.len()),
                ("nodes.zone", nodes.zone.len()),
                ("nodes.capacity_bytes", nodes.capacity_bytes.len()),
                ("nodes.healthy_copies", nodes.healthy_copies.len()),
                ("nodes.moves_inflight", nodes.moves_inflight.len()),
                ("nodes.inventory_blob_count", nodes.inventory_blob_count.len()),
                ("nodes.inventory_reported_ms", nodes.inventory_reported_ms.len()),
                ("locality.coordinate_x_us", locality.coordinate_x_us.len()),
                ("locality.coordinate_y_us", locality.coordinate_y_us.len()),
                ("locality.coordinate_height_us", locality.coordinate_height_us.len()),
                ("locality.coordinate_error", locality.coordinate_error.len()),
                ("locality.rtt_average_us", locality.rtt_average_us.len()),
            ],
        )?;
        let blobs = &$snapshot.blobs;
        let blob_rows = blobs.hash.len();
        same_length(
            blob_rows,
            &[
                ("blobs.size_bytes", blobs.size_bytes.len()),
                ("blobs.replicas_wanted", blobs.replicas_wanted.len()),
                ("blobs.healthy_count", blobs.healthy_count.len()),
                ("blobs.counted_copies", blobs.counted_copies.len()),
                ("blobs.drift", blobs.drift.len()),
                ("blobs.held_by", blobs.held_by.len()),
                ("blobs.held_until_ms", blobs.held_until_ms.len()),
                ("blobs.backoff_until_ms", blobs.backoff_until_ms.len()),
                ("blobs.pull_failures", blobs.pull_failures.len()),
                ("blobs.plan_valid", blobs.plan_valid.len()),
            ],
        )?;
        let holders = blobs.holder_node.len();
        same_length(
            holders,
            &[("blobs.holder_state", blobs.holder_state.len()), ("blobs.holder_flags", blobs.holder_flags.len())],
        )?;
        csr_shape("blobs.holder_start", blobs.holder_start.iter(), blob_rows, holders)?;
        csr_shape("blobs.plan_start", blobs.plan_start.iter(), blob_rows, blobs.plan_node.len())?;
        csr_shape("nodes.label_start", nodes.label_start.iter(), node_rows, nodes.label.len())?;
        same_length(
            locality.rtt_from.len(),
            &[
                ("locality.rtt_to", locality.rtt_to.len()),
                ("locality.rtt_pair_average_us", locality.rtt_pair_average_us.len()),
                ("locality.rtt_last_us", locality.rtt_last_us.len()),
                ("locality.rtt_samples", locality.rtt_samples.len()),
                ("locality.rtt_last_ms", locality.rtt_last_ms.len()),
            ],
        )?;
        let (specs, symbols) = ($snapshot.specs.len(), $snapshot.symbols.len());
        for node in blobs.holder_node.iter() {
            in_table("blobs.holder_node", node, node_rows, false)?;
        }
        for node in blobs.plan_node.iter() {
            in_table("blobs.plan_node", node, node_rows, false)?;
        }
        for zone in nodes.zone.iter() {
            in_table("nodes.zone", zone, symbols, true)?;
        }
        for label in nodes.label.iter() {
            in_table("nodes.label", label, symbols, false)?;
        }
        for daemon in $snapshot.daemons.iter() {
            in_table("daemons.spec", &daemon.spec, specs, false)?;
            in_table("daemons.node", &daemon.node, node_rows, false)?;
        }
        for action in $snapshot.actions.iter() {
            in_table("actions.node", &action.node, node_rows, false)?;
            in_table("actions.blob", &action.blob, blob_rows, true)?;
            in_table("actions.peer", &action.peer, node_rows, true)?;
            in_table("actions.spec", &action.spec, specs, true)?;
        }
        for pending in $snapshot.pending.listed.iter() {
            in_table("pending.listed.blob", &pending.blob, blob_rows, false)?;
        }
        for blob in $snapshot.drift.listed.iter() {
            in_table("drift.listed", blob, blob_rows, false)?;
        }
        for node in locality.rtt_from.iter().chain(locality.rtt_to.iter()) {
            in_table("locality.rtt_from/rtt_to", node, node_rows, false)?;
        }
        for blocker in $snapshot.drain_blockers.listed.iter() {
            in_table("drain_blockers.node", &blocker.node, node_rows, false)?;
            in_table("drain_blockers.blob", &blocker.blob, blob_rows, false)?;
        }
        Ok(())
    }};
}

/// The shape of a snapshot about to be written (the builder asserts it).
pub(super) fn check_native_shape(snapshot: &Snapshot) -> Result<(), String> {
    check_shape_of!(snapshot)
}

/// The shape of a validated archive (the reader refuses a file that fails it).
pub(super) fn check_archived_shape(snapshot: &ArchivedSnapshot) -> Result<(), String> {
    check_shape_of!(snapshot)
}
