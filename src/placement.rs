//! The built-in blob planner (the default for "Dataforts"): weighted rendezvous
//! hashing, also called highest random weight.
//!
//! Purpose: decide, for one blob at one placement epoch, which nodes should hold
//! its copies, so that every node computing the plan from the same state gets the
//! same answer and small changes to the cluster move few copies. Each eligible node
//! draws a uniform `u` in (0,1) from a 64-bit mix of its name key, the blob hash and
//! the epoch, and scores `-weight / ln(u)`; the highest scores win. A node wins the
//! top slot with probability `weight / total weight`, and removing a node only
//! changes the plans that contained it (its slot goes to the next best node).
//!
//! Invariants:
//! - The result is a pure function of the inputs taken as a set: scores use only
//!   integer mixing and IEEE-754 `+ - * /` (the logarithm is [`ln_deterministic`],
//!   built from the bit pattern, never libm), and every comparison is a total order
//!   (score descending, then node key ascending, then row ascending), so neither
//!   platform nor candidate order changes a plan.
//! - A node appears at most once in a plan; pinned nodes always appear, first, in
//!   the order given; a candidate whose weight is zero, negative, NaN or infinite is
//!   never chosen.
//! - [`plan`] allocates nothing once `scratch` and `out` are warm: its other working
//!   memory is fixed-size stack arrays bounded by `replicas <= 255`.
//! - Zones (`zone_spread`): a candidate whose zone is `SymbolId::NONE` (no zone
//!   declared) is a failure domain of its own: it never blocks, and is never blocked
//!   by, another node's zone. A cluster without zones therefore plans exactly as with
//!   spread off. Pinned nodes that are also candidates use up their zone.

use smallvec::SmallVec;

use crate::event::BlobHash;
use crate::state::ids::{NodeRow, SymbolId};

/// One eligible node as the planner sees it. Callers pass candidates in node-row order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub node: NodeRow,
    pub key: u64,
    pub weight: f64,
    pub zone: SymbolId,
}

/// Most nodes a plan can pick from the candidates (`replicas` is a `u8`).
const PICKS_MAX: usize = u8::MAX as usize;

/// With zone spread, how many best candidates per wanted copy are sorted up front;
/// a plan that still lacks a zone after them scans the rest linearly.
const SPREAD_PREFIX_PER_COPY: usize = 4;

/// Marks a scratch entry already picked (high bit of its candidate index).
const PICKED_BIT: u32 = 1 << 31;

/// Mantissa bits used for the uniform draw (so `k + 0.5` is exact in an f64).
const DRAW_BITS: u32 = 52;

/// Domain separation for the per-blob seed, so a zero epoch still mixes.
const BLOB_SEED_DOMAIN: u64 = 0x6d65_7368_6f73_706c; // "meshospl"

/// Weight multiplier for a cool node (load below `WARM_LOAD_PERMILLE`).
const COOL_FACTOR: f64 = 1.0;
/// Weight multiplier for a warm node (load in `WARM_LOAD_PERMILLE..HOT_LOAD_PERMILLE`).
const WARM_FACTOR: f64 = 0.5;
/// Weight multiplier for a hot node (load at or above `HOT_LOAD_PERMILLE`).
const HOT_FACTOR: f64 = 0.25;
/// Load at which a node counts as warm.
pub const WARM_LOAD_PERMILLE: u16 = 600;
/// Load at which a node counts as hot.
pub const HOT_LOAD_PERMILLE: u16 = 850;

const BYTES_PER_GIB: f64 = (1u64 << 30) as f64;

/// A stable 64-bit key for a node name (blake3 of the name, first 8 bytes LE): placement depends on names, not on row order.
pub fn node_key(name: &str) -> u64 {
    let hash = blake3::hash(name.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// The rendezvous score of a node for a blob at a placement epoch: -weight / ln(u) with u in (0,1] derived from a 64-bit mix of (key, blob hash, epoch). Higher wins.
///
/// `u` is in fact drawn from the open interval (0,1) (`(k + 0.5) / 2^52`), so
/// `ln(u)` is never zero and the score of a valid weight is positive (it is `+inf`
/// only for weights above ~1e292). A weight that is zero, negative, NaN or infinite
/// scores `-inf`: such a node is never chosen.
pub fn score(key: u64, blob: &BlobHash, epoch: u32, weight: f64) -> f64 {
    if !weight_is_eligible(weight) {
        return f64::NEG_INFINITY;
    }
    score_seeded(key, blob_seed(blob, epoch), weight)
}

/// Chooses `replicas` nodes for `blob`: pinned nodes first (always, in the order given, even if not among candidates), then the best-scoring candidates; with `zone_spread`, prefer candidates whose zone is not yet used, falling back to any zone when zones run out. Output sorted by descending score after the pinned ones; never a node twice; fewer than `replicas` only when there are not enough candidates. `scratch` is a caller-owned buffer reused across calls (no allocation once warm).
///
/// Details: duplicate pinned rows appear once; if there are at least `replicas`
/// distinct pinned nodes, the plan is exactly those (all of them, even beyond
/// `replicas`). A candidate that is also pinned is not picked again. Ineligible
/// weights (see [`score`]) are skipped. `SymbolId::NONE` zones never conflict (see
/// the module docs). Ties break by node key, then row, both ascending.
#[allow(clippy::too_many_arguments)]
pub fn plan(
    blob: &BlobHash,
    epoch: u32,
    replicas: u8,
    zone_spread: bool,
    pinned: &[NodeRow],
    candidates: &[Candidate],
    scratch: &mut Vec<(f64, u32)>,
    out: &mut SmallVec<[NodeRow; 8]>,
) {
    assert!(candidates.len() < PICKED_BIT as usize, "placement: too many candidates");
    out.clear();
    for &node in pinned {
        debug_assert!(!node.is_none(), "placement: pinned NodeRow::NONE");
        if !out.contains(&node) {
            out.push(node);
        }
    }
    let pinned_len = out.len();
    let need = (replicas as usize).saturating_sub(pinned_len);
    if need == 0 {
        return;
    }
    debug_assert!(need <= PICKS_MAX);

    // Score every eligible candidate; pinned candidates only contribute their zone.
    let seed = blob_seed(blob, epoch);
    let mut picks = Picks::new();
    scratch.clear();
    for (index, candidate) in candidates.iter().enumerate() {
        debug_assert!(!candidate.node.is_none(), "placement: candidate NodeRow::NONE");
        if out[..pinned_len].contains(&candidate.node) {
            if zone_spread {
                picks.use_zone(candidate.zone);
            }
            continue;
        }
        if !weight_is_eligible(candidate.weight) {
            continue;
        }
        let node_score = score_seeded(candidate.key, seed, candidate.weight);
        debug_assert!(node_score > 0.0 && !node_score.is_nan(), "placement: bad score {node_score}");
        scratch.push((node_score, index as u32));
    }
    let total = scratch.len();
    if total == 0 {
        return;
    }

    let order = |a: &(f64, u32), b: &(f64, u32)| {
        let (ca, cb) = (&candidates[(a.1 & !PICKED_BIT) as usize], &candidates[(b.1 & !PICKED_BIT) as usize]);
        b.0.total_cmp(&a.0).then(ca.key.cmp(&cb.key)).then(ca.node.cmp(&cb.node))
    };

    // Sort only the best `prefix_len` entries; the order is total, so the result is
    // the same as sorting everything.
    let prefix_len = if zone_spread { need.saturating_mul(SPREAD_PREFIX_PER_COPY) } else { need }.min(total);
    if prefix_len < total {
        scratch.select_nth_unstable_by(prefix_len - 1, order);
    }
    scratch[..prefix_len].sort_unstable_by(order);

    if zone_spread {
        // Phase 1: the best candidate of each unused zone, best first.
        for position in 0..prefix_len {
            if picks.len == need {
                break;
            }
            let candidate = &candidates[scratch[position].1 as usize];
            if picks.zone_used(candidate.zone) || picks.row_taken(scratch, candidates, candidate.node) {
                continue;
            }
            picks.use_zone(candidate.zone);
            picks.pick(scratch, position);
        }
        // Rarely: the sorted prefix ran out of zones; find the best of each further
        // unused zone among the unsorted rest, one linear scan per pick.
        while picks.len < need && prefix_len < total {
            let mut best: Option<usize> = None;
            for position in prefix_len..total {
                let entry = scratch[position];
                if entry.1 & PICKED_BIT != 0 {
                    continue;
                }
                let candidate = &candidates[entry.1 as usize];
                if picks.zone_used(candidate.zone) || picks.row_taken(scratch, candidates, candidate.node) {
                    continue;
                }
                if best.is_none_or(|b| order(&entry, &scratch[b]).is_lt()) {
                    best = Some(position);
                }
            }
            let Some(position) = best else { break };
            picks.use_zone(candidates[scratch[position].1 as usize].zone);
            picks.pick(scratch, position);
        }
    }
    // Phase 2 (and the whole plan without spread): the best entries not yet picked.
    // The prefix holds at least `need` entries (or all), so it holds the best unpicked ones.
    for position in 0..prefix_len {
        if picks.len == need {
            break;
        }
        let entry = scratch[position];
        if entry.1 & PICKED_BIT != 0 || picks.row_taken(scratch, candidates, candidates[entry.1 as usize].node) {
            continue;
        }
        picks.pick(scratch, position);
    }
    assert!(picks.len <= need);
    debug_assert!(picks.len == need || picks.len == total || has_duplicate_rows(candidates));

    // Emit picks in descending score (order over their scratch entries).
    let positions = &mut picks.positions[..picks.len];
    positions.sort_unstable_by(|&a, &b| order(&scratch[a as usize], &scratch[b as usize]));
    for &position in positions.iter() {
        let node = candidates[(scratch[position as usize].1 & !PICKED_BIT) as usize].node;
        debug_assert!(!out.contains(&node), "placement: node {node:?} twice");
        out.push(node);
    }
    debug_assert!(out.len() <= (replicas as usize).max(pinned_len));
}

/// Working memory of one [`plan`] call, on the stack: the scratch positions picked so
/// far and the zones they (and pinned candidates) use. Both hold at most `replicas`
/// entries, since pinned rows are fewer than `replicas` when candidates are consulted.
struct Picks {
    positions: [u32; PICKS_MAX],
    len: usize,
    zones: [SymbolId; PICKS_MAX],
    zones_len: usize,
}

impl Picks {
    fn new() -> Picks {
        Picks { positions: [0; PICKS_MAX], len: 0, zones: [SymbolId::NONE; PICKS_MAX], zones_len: 0 }
    }

    /// Whether a zone is taken; `SymbolId::NONE` never is (each unzoned node is its own zone).
    fn zone_used(&self, zone: SymbolId) -> bool {
        !zone.is_none() && self.zones[..self.zones_len].contains(&zone)
    }

    fn use_zone(&mut self, zone: SymbolId) {
        if self.zone_used(zone) || zone.is_none() {
            return;
        }
        // Only a caller repeating candidate rows could overflow; then forget the zone.
        if self.zones_len < PICKS_MAX {
            self.zones[self.zones_len] = zone;
            self.zones_len += 1;
        }
    }

    /// Marks a scratch entry picked (`PICKED_BIT`) and records its position.
    fn pick(&mut self, scratch: &mut [(f64, u32)], position: usize) {
        debug_assert!(scratch[position].1 & PICKED_BIT == 0, "placement: picked twice");
        assert!(self.len < PICKS_MAX);
        scratch[position].1 |= PICKED_BIT;
        self.positions[self.len] = position as u32;
        self.len += 1;
    }

    /// Whether `row` is already picked (only possible when the caller repeats a row).
    fn row_taken(&self, scratch: &[(f64, u32)], candidates: &[Candidate], row: NodeRow) -> bool {
        self.positions[..self.len]
            .iter()
            .any(|&p| candidates[(scratch[p as usize].1 & !PICKED_BIT) as usize].node == row)
    }
}

/// Weight from capacity and heat: proportional to capacity, reduced when hot (load_permille 0..=1000), never zero for a node with capacity; document the formula. Heat is bucketed (e.g. cool / warm / hot) so small load changes do not move placements.
///
/// Formula: `weight = capacity_bytes / 2^30 (capacity in GiB) x heat factor`, with
/// heat factor 1.0 when cool (`load < 600‰`), 0.5 when warm (`600‰ <= load < 850‰`)
/// and 0.25 when hot (`load >= 850‰`; loads above 1000‰ count as hot). A node of
/// zero capacity weighs 0 (never chosen); any other weighs more than 0 (the
/// smallest, one byte when hot, is about 2.3e-10).
pub fn weight(capacity_bytes: u64, load_permille: u16) -> f64 {
    let heat_factor = if load_permille >= HOT_LOAD_PERMILLE {
        HOT_FACTOR
    } else if load_permille >= WARM_LOAD_PERMILLE {
        WARM_FACTOR
    } else {
        COOL_FACTOR
    };
    let weight = capacity_bytes as f64 / BYTES_PER_GIB * heat_factor;
    debug_assert!(weight.is_finite() && weight >= 0.0);
    debug_assert!((capacity_bytes == 0) == (weight == 0.0));
    weight
}

/// Natural logarithm from the bit pattern: `x = m * 2^e` with `m` in
/// `[sqrt(1/2), sqrt(2)]`, then `ln(m) = 2 atanh(s)` with `s = (m-1)/(m+1)`,
/// `|s| <= 0.1716`, summed as an odd series to `s^21` (truncation below 3e-17
/// relative), and `e ln 2` from a two-part constant. Only `+ - * /`, so every
/// platform gets the same bits; accurate to about 1e-15 relative on (0,1],
/// subnormals included. `ln(1) = 0`, `ln(0) = -inf`, `ln(+inf) = +inf`, NaN or
/// negative gives NaN.
pub fn ln_deterministic(x: f64) -> f64 {
    // fdlibm's split of ln 2 (given as bits): LN2_HI has 32 trailing zero bits, so
    // e * LN2_HI is exact for any exponent; LN2_LO carries the rest.
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
    const SQRT_2: f64 = std::f64::consts::SQRT_2;
    const SUBNORMAL_SCALE_BITS: i64 = 54;
    const MANTISSA_MASK: u64 = (1u64 << 52) - 1;
    const EXPONENT_BIAS: i64 = 1023;

    if x.is_nan() || x < 0.0 {
        return f64::NAN;
    }
    if x == 0.0 {
        return f64::NEG_INFINITY;
    }
    if x == f64::INFINITY {
        return f64::INFINITY;
    }
    if x == 1.0 {
        return 0.0;
    }
    let mut bits = x.to_bits();
    let mut exponent = ((bits >> 52) & 0x7ff) as i64;
    if exponent == 0 {
        // Subnormal: scale into the normal range exactly.
        bits = (x * (1u64 << SUBNORMAL_SCALE_BITS) as f64).to_bits();
        exponent = ((bits >> 52) & 0x7ff) as i64 - SUBNORMAL_SCALE_BITS;
    }
    exponent -= EXPONENT_BIAS;
    let mut mantissa = f64::from_bits((bits & MANTISSA_MASK) | ((EXPONENT_BIAS as u64) << 52));
    debug_assert!((1.0..2.0).contains(&mantissa));
    if mantissa > SQRT_2 {
        mantissa *= 0.5;
        exponent += 1;
    }
    let s = (mantissa - 1.0) / (mantissa + 1.0);
    debug_assert!(s.abs() <= 0.1716);
    let s2 = s * s;
    let series = 1.0
        + s2 * (1.0 / 3.0
            + s2 * (1.0 / 5.0
                + s2 * (1.0 / 7.0
                    + s2 * (1.0 / 9.0
                        + s2 * (1.0 / 11.0
                            + s2 * (1.0 / 13.0
                                + s2 * (1.0 / 15.0 + s2 * (1.0 / 17.0 + s2 * (1.0 / 19.0 + s2 * (1.0 / 21.0))))))))));
    let ln_mantissa = 2.0 * s * series;
    let e = exponent as f64;
    e * LN2_HI + (ln_mantissa + e * LN2_LO)
}

/// Whether a node of this weight may be chosen at all.
#[inline]
fn weight_is_eligible(weight: f64) -> bool {
    weight.is_finite() && weight > 0.0
}

/// SplitMix64's finaliser: a bijective 64-bit mix.
#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One 64-bit seed per (blob, epoch), folding all 256 bits of the hash.
fn blob_seed(blob: &BlobHash, epoch: u32) -> u64 {
    let mut seed = mix64(BLOB_SEED_DOMAIN ^ epoch as u64);
    for word in blob.chunks_exact(8) {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(word);
        seed = mix64(seed ^ u64::from_le_bytes(bytes));
    }
    seed
}

/// `-weight / ln(u)` for a node key under a blob seed; `weight` must be eligible.
#[inline]
fn score_seeded(key: u64, seed: u64, weight: f64) -> f64 {
    debug_assert!(weight_is_eligible(weight));
    let draw = mix64(seed ^ mix64(key)) >> (64 - DRAW_BITS);
    let u = (draw as f64 + 0.5) / (1u64 << DRAW_BITS) as f64;
    debug_assert!(u > 0.0 && u < 1.0);
    let ln_u = ln_deterministic(u);
    debug_assert!(ln_u < 0.0);
    -weight / ln_u
}

/// Whether two candidates share a row (a caller contract violation; debug checks only).
fn has_duplicate_rows(candidates: &[Candidate]) -> bool {
    candidates.iter().enumerate().any(|(i, a)| candidates[..i].iter().any(|b| b.node == a.node))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relative_error(got: f64, want: f64) -> f64 {
        if want == 0.0 {
            got.abs()
        } else {
            ((got - want) / want).abs()
        }
    }

    #[test]
    fn ln_matches_libm_on_a_dense_grid_and_edges() {
        let mut worst = 0.0f64;
        for i in 1..=200_000u64 {
            let x = i as f64 / 200_000.0;
            worst = worst.max(relative_error(ln_deterministic(x), x.ln()));
        }
        for &x in &[
            f64::MIN_POSITIVE,
            5e-324,
            1e-310,
            1e-300,
            1e-100,
            1e-20,
            0.5,
            0.75,
            0.999_999_999_999,
            1.0 - f64::EPSILON / 2.0,
        ] {
            worst = worst.max(relative_error(ln_deterministic(x), x.ln()));
        }
        assert!(worst < 1e-14, "worst relative error {worst:e}");
        assert_eq!(ln_deterministic(1.0), 0.0);
        assert_eq!(ln_deterministic(0.0), f64::NEG_INFINITY);
        assert_eq!(ln_deterministic(f64::INFINITY), f64::INFINITY);
        assert!(ln_deterministic(-1.0).is_nan());
        assert!(ln_deterministic(f64::NAN).is_nan());
        // Above 1 too (not needed by the planner, but the function is general).
        assert!(relative_error(ln_deterministic(1e300), 1e300f64.ln()) < 1e-15);
    }

    #[test]
    fn ln_of_near_one_keeps_relative_accuracy() {
        let mut x = 1.0f64;
        for _ in 0..60 {
            x = 1.0 - (1.0 - x).max(f64::EPSILON) * 1.7;
            if x <= 0.0 {
                break;
            }
            assert!(relative_error(ln_deterministic(x), x.ln()) < 1e-14, "x = {x}");
        }
    }

    #[test]
    fn weight_buckets_heat_and_keeps_capacity_positive() {
        let gib = 1u64 << 30;
        assert_eq!(weight(gib, 0), 1.0);
        assert_eq!(weight(gib, 599), 1.0);
        assert_eq!(weight(gib, 600), 0.5);
        assert_eq!(weight(gib, 849), 0.5);
        assert_eq!(weight(gib, 850), 0.25);
        assert_eq!(weight(gib, 1000), 0.25);
        assert_eq!(weight(gib, u16::MAX), 0.25);
        assert_eq!(weight(2 * gib, 10), 2.0 * weight(gib, 500));
        assert_eq!(weight(0, 0), 0.0);
        assert!(weight(1, 1000) > 0.0);
        assert!(weight(u64::MAX, 0).is_finite());
    }

    #[test]
    fn score_rejects_bad_weights_and_is_positive_otherwise() {
        let blob = [7u8; 32];
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            assert_eq!(score(1, &blob, 0, bad), f64::NEG_INFINITY);
        }
        for key in 0..1000u64 {
            let s = score(key, &blob, 3, 1.0);
            assert!(s > 0.0 && s.is_finite());
            assert_eq!(s.to_bits(), score(key, &blob, 3, 1.0).to_bits());
            assert_eq!((2.0 * s).to_bits(), score(key, &blob, 3, 2.0).to_bits());
        }
        assert_ne!(score(1, &blob, 0, 1.0), score(1, &blob, 1, 1.0));
    }

    #[test]
    fn node_key_is_blake3_prefix() {
        let hash = blake3::hash(b"node-1");
        assert_eq!(node_key("node-1").to_le_bytes(), hash.as_bytes()[..8]);
        assert_ne!(node_key("node-1"), node_key("node-2"));
    }

    #[test]
    fn ties_break_by_key_then_row() {
        // Same key and weight: identical scores, so the lower row wins.
        let zone = SymbolId::NONE;
        let candidates = [
            Candidate { node: NodeRow(5), key: 9, weight: 1.0, zone },
            Candidate { node: NodeRow(2), key: 9, weight: 1.0, zone },
            Candidate { node: NodeRow(7), key: 9, weight: 1.0, zone },
        ];
        let mut scratch = Vec::new();
        let mut out = SmallVec::new();
        plan(&[1; 32], 0, 2, false, &[], &candidates, &mut scratch, &mut out);
        assert_eq!(out.as_slice(), &[NodeRow(2), NodeRow(5)]);
    }

    #[test]
    fn duplicate_candidate_rows_are_picked_once() {
        let zone = SymbolId::NONE;
        let candidates = [
            Candidate { node: NodeRow(1), key: 1, weight: 1.0, zone },
            Candidate { node: NodeRow(1), key: 2, weight: 1.0, zone },
        ];
        let mut scratch = Vec::new();
        let mut out = SmallVec::new();
        plan(&[1; 32], 0, 2, false, &[], &candidates, &mut scratch, &mut out);
        assert_eq!(out.as_slice(), &[NodeRow(1)]);
    }

    #[test]
    fn pinned_fill_the_plan_and_are_deduplicated() {
        let candidates: Vec<Candidate> =
            (0..5).map(|i| Candidate { node: NodeRow(i), key: i as u64, weight: 1.0, zone: SymbolId(i % 2) }).collect();
        let mut scratch = Vec::new();
        let mut out = SmallVec::new();
        plan(&[3; 32], 0, 2, true, &[NodeRow(9), NodeRow(9), NodeRow(8)], &candidates, &mut scratch, &mut out);
        assert_eq!(out.as_slice(), &[NodeRow(9), NodeRow(8)]);
        // A pinned candidate uses its zone: the other two picks avoid zone 1.
        plan(&[3; 32], 0, 3, true, &[NodeRow(1)], &candidates, &mut scratch, &mut out);
        assert_eq!(out[0], NodeRow(1));
        assert_eq!(out.len(), 3);
        assert!(!out[1..].contains(&NodeRow(1)));
        let zone_zero = out[1..].iter().filter(|n| n.0 % 2 == 0).count();
        assert!(zone_zero >= 1, "{out:?}");
    }
}
