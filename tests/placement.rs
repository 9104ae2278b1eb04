//! The built-in planner: deterministic ln against libm, plans as a pure function of the
//! candidate set, minimal movement when nodes leave or join or an epoch changes, zone
//! spread, pinned nodes, capacity weighting and uniformity over 10,000 blobs.

use meshos::event::BlobHash;
use meshos::placement::{ln_deterministic, node_key, plan, score, weight, Candidate};
use meshos::sim::rng::Rng;
use meshos::state::ids::{NodeRow, SymbolId};
use smallvec::SmallVec;

type Plan = SmallVec<[NodeRow; 8]>;

const BLOBS: usize = 10_000;
const GIB: u64 = 1 << 30;

fn blob(index: usize) -> BlobHash {
    *blake3::hash(&(index as u64).to_le_bytes()).as_bytes()
}

fn node(row: u32, zones: u32, weight: f64) -> Candidate {
    let zone = if zones == 0 { SymbolId::NONE } else { SymbolId(row % zones) };
    Candidate { node: NodeRow(row), key: node_key(&format!("node-{row}")), weight, zone }
}

fn cluster(nodes: u32, zones: u32) -> Vec<Candidate> {
    (0..nodes).map(|row| node(row, zones, 1.0)).collect()
}

fn plan_one(
    blob: &BlobHash,
    epoch: u32,
    replicas: u8,
    spread: bool,
    pinned: &[NodeRow],
    candidates: &[Candidate],
) -> Plan {
    let mut scratch = Vec::new();
    let mut out = Plan::new();
    plan(blob, epoch, replicas, spread, pinned, candidates, &mut scratch, &mut out);
    out
}

fn plan_all(candidates: &[Candidate], replicas: u8, spread: bool, epochs: &[u32]) -> Vec<Plan> {
    let mut scratch = Vec::new();
    (0..BLOBS)
        .map(|b| {
            let mut out = Plan::new();
            plan(&blob(b), epochs[b], replicas, spread, &[], candidates, &mut scratch, &mut out);
            out
        })
        .collect()
}

fn zone_of(candidates: &[Candidate], row: NodeRow) -> SymbolId {
    candidates.iter().find(|c| c.node == row).expect("a candidate").zone
}

fn scores_descend(candidates: &[Candidate], blob: &BlobHash, epoch: u32, plan: &[NodeRow]) -> bool {
    let scores: Vec<f64> = plan
        .iter()
        .map(|&row| {
            let c = candidates.iter().find(|c| c.node == row).unwrap();
            score(c.key, blob, epoch, c.weight)
        })
        .collect();
    scores.windows(2).all(|w| w[0] >= w[1])
}

#[test]
fn ln_deterministic_matches_libm_over_the_unit_interval() {
    let mut points =
        vec![1.0, 0.5, f64::MIN_POSITIVE, 5e-324, 1e-320, 1e-310, 1.0 - f64::EPSILON / 2.0, 1.0 - f64::EPSILON];
    // Every binade of (0,1], normal and subnormal, at several mantissas.
    let mut x = 1.0f64;
    while x > 0.0 {
        for m in [1.0, 1.1, 1.25, 1.414, 1.4143, 1.5, 1.75, 1.999] {
            if x * m / 2.0 > 0.0 {
                points.push(x * m / 2.0);
            }
        }
        x /= 2.0;
    }
    // Random bit patterns in (0,1), and values just below 1.
    let mut rng = Rng::new(11);
    for _ in 0..200_000 {
        let bits = rng.below(1.0f64.to_bits() - 1) + 1;
        points.push(f64::from_bits(bits));
        points.push(1.0 - (rng.below(1 << 20) + 1) as f64 * f64::EPSILON / 2.0);
    }
    let mut worst = 0.0f64;
    for &x in &points {
        assert!(x > 0.0 && x <= 1.0, "{x}");
        let (got, want) = (ln_deterministic(x), x.ln());
        let error = if want == 0.0 { got.abs() } else { ((got - want) / want).abs() };
        assert!(error < 1e-13, "ln({x:e}) = {got:e}, libm {want:e}");
        worst = worst.max(error);
    }
    assert_eq!(ln_deterministic(1.0), 0.0);
    println!("{} points, worst relative error {worst:e}", points.len());
}

#[test]
fn plans_are_a_pure_function_of_the_candidate_set() {
    let candidates = cluster(60, 4);
    let mut rng = Rng::new(5);
    let mut shuffled = candidates.clone();
    for b in 0..500 {
        // Fisher-Yates with the seeded rng.
        for i in (1..shuffled.len()).rev() {
            shuffled.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let pinned = [NodeRow(b as u32 % 60)];
        for (replicas, spread, pinned) in [(3, true, &[][..]), (5, false, &[][..]), (4, true, &pinned[..])] {
            let first = plan_one(&blob(b), 0, replicas, spread, pinned, &candidates);
            assert_eq!(first, plan_one(&blob(b), 0, replicas, spread, pinned, &candidates));
            assert_eq!(first, plan_one(&blob(b), 0, replicas, spread, pinned, &shuffled), "blob {b}");
        }
    }
}

#[test]
fn scratch_and_output_do_not_grow_once_warm() {
    let candidates = cluster(100, 3);
    let mut scratch = Vec::new();
    let mut out = Plan::new();
    plan(&blob(0), 0, 3, true, &[], &candidates, &mut scratch, &mut out);
    let (capacity, pointer) = (scratch.capacity(), scratch.as_ptr());
    for b in 1..1000 {
        plan(&blob(b), 0, 3, true, &[], &candidates, &mut scratch, &mut out);
        assert!(!out.spilled());
    }
    assert_eq!((scratch.capacity(), scratch.as_ptr()), (capacity, pointer));
}

#[test]
fn removing_a_node_moves_only_its_own_copies() {
    let candidates = cluster(100, 3);
    let epochs = vec![0; BLOBS];
    let before = plan_all(&candidates, 3, true, &epochs);
    let removed = NodeRow(42);
    let without: Vec<Candidate> = candidates.iter().copied().filter(|c| c.node != removed).collect();
    let after = plan_all(&without, 3, true, &epochs);
    let mut moved = 0;
    for (old, new) in before.iter().zip(&after) {
        if !old.contains(&removed) {
            assert_eq!(old, new, "a plan without the removed node changed");
            continue;
        }
        moved += 1;
        assert_eq!(new.len(), 3);
        let kept = old.iter().filter(|&&n| n != removed).all(|n| new.contains(n));
        let newcomers: Vec<_> = new.iter().filter(|n| !old.contains(n)).collect();
        assert!(kept && newcomers.len() == 1, "old {old:?} new {new:?}");
        // The newcomer takes the removed node's zone.
        assert_eq!(zone_of(&candidates, *newcomers[0]), zone_of(&candidates, removed));
    }
    assert!(moved > 0);
}

#[test]
fn adding_a_node_moves_about_its_share_of_copies() {
    let candidates = cluster(100, 3);
    let epochs = vec![0; BLOBS];
    let before = plan_all(&candidates, 3, true, &epochs);
    let added = node(100, 3, 1.0);
    let mut with = candidates.clone();
    with.push(added);
    let after = plan_all(&with, 3, true, &epochs);
    let (mut changed, mut primary_changed) = (0, 0);
    for (old, new) in before.iter().zip(&after) {
        if old == new {
            continue;
        }
        changed += 1;
        primary_changed += (old[0] != new[0]) as usize;
        assert!(new.contains(&added.node), "a plan changed without the new node: {old:?} -> {new:?}");
        assert_eq!(old.iter().filter(|n| !new.contains(n)).count(), 1, "{old:?} -> {new:?}");
    }
    // The new node wins its zone (34 nodes) for ~1/34 of blobs, and the top slot for ~1/101.
    println!("added a node: {changed} plans changed, {primary_changed} primaries");
    assert!(changed > BLOBS * 2 / 100 && changed < BLOBS * 4 / 100, "{changed} plans changed");
    assert!(primary_changed < BLOBS * 2 / 100, "{primary_changed} primaries changed");
}

#[test]
fn a_new_epoch_replans_only_its_blob() {
    let candidates = cluster(100, 3);
    let mut epochs = vec![0; BLOBS];
    let before = plan_all(&candidates, 3, true, &epochs);
    epochs[17] = 1;
    let after = plan_all(&candidates, 3, true, &epochs);
    for (b, (old, new)) in before.iter().zip(&after).enumerate() {
        if b != 17 {
            assert_eq!(old, new, "blob {b}");
        }
    }
    // A new epoch is a fresh draw: most blobs get a different plan.
    let replanned = (0..200).filter(|&b| plan_one(&blob(b), 1, 3, true, &[], &candidates) != before[b]).count();
    assert!(replanned > 180, "{replanned}");
}

#[test]
fn zone_spread_covers_every_zone_and_falls_back_when_zones_run_out() {
    let candidates = cluster(100, 3);
    let epochs = vec![0; BLOBS];
    for (b, p) in plan_all(&candidates, 3, true, &epochs).iter().enumerate() {
        let mut zones: Vec<u32> = p.iter().map(|&n| zone_of(&candidates, n).0).collect();
        zones.sort_unstable();
        assert_eq!(zones, [0, 1, 2], "blob {b}: {p:?}");
        assert!(scores_descend(&candidates, &blob(b), 0, p));
    }
    // Two zones, three copies: both zones used, third copy anywhere.
    let two_zones = cluster(40, 2);
    for b in 0..1000 {
        let p = plan_one(&blob(b), 0, 3, true, &[], &two_zones);
        assert_eq!(p.len(), 3);
        let zones: Vec<u32> = p.iter().map(|&n| zone_of(&two_zones, n).0).collect();
        assert!(zones.contains(&0) && zones.contains(&1), "{zones:?}");
    }
    // One dominant zone (90 of 92 nodes): the two small zones are still found.
    let skewed: Vec<Candidate> = (0..92)
        .map(|row| Candidate { zone: SymbolId(if row < 90 { 0 } else { row - 89 }), ..node(row, 1, 1.0) })
        .collect();
    for b in 0..1000 {
        let p = plan_one(&blob(b), 0, 3, true, &[], &skewed);
        let mut zones: Vec<u32> = p.iter().map(|&n| zone_of(&skewed, n).0).collect();
        zones.sort_unstable();
        assert_eq!(zones, [0, 1, 2]);
        assert!(scores_descend(&skewed, &blob(b), 0, &p));
    }
}

#[test]
fn without_spread_plans_are_the_top_scores_whatever_the_zones() {
    let candidates = cluster(100, 3);
    let plans = plan_all(&candidates, 3, false, &vec![0; BLOBS]);
    let mut same_zone_twice = 0;
    for (b, p) in plans.iter().enumerate() {
        let mut ranked: Vec<(f64, NodeRow)> =
            candidates.iter().map(|c| (score(c.key, &blob(b), 0, c.weight), c.node)).collect();
        ranked.sort_by(|x, y| y.0.total_cmp(&x.0));
        let top: Vec<NodeRow> = ranked[..3].iter().map(|r| r.1).collect();
        assert_eq!(p.as_slice(), top.as_slice(), "blob {b}");
        let mut zones: Vec<u32> = p.iter().map(|&n| zone_of(&candidates, n).0).collect();
        zones.sort_unstable();
        zones.dedup();
        same_zone_twice += (zones.len() < 3) as usize;
    }
    // Distinct zones by chance only: about 2/9 of plans.
    assert!(same_zone_twice > BLOBS / 2, "{same_zone_twice}");
    // Unzoned nodes are each their own zone: spread changes nothing.
    let unzoned = cluster(50, 0);
    for b in 0..500 {
        assert_eq!(plan_one(&blob(b), 0, 3, true, &[], &unzoned), plan_one(&blob(b), 0, 3, false, &[], &unzoned));
    }
}

#[test]
fn pinned_nodes_come_first_and_short_clusters_give_short_plans() {
    let candidates = cluster(10, 3);
    for b in 0..200 {
        let pinned = [NodeRow(4), NodeRow(500)];
        let p = plan_one(&blob(b), 0, 3, true, &pinned, &candidates);
        assert_eq!(&p[..2], &pinned);
        assert_eq!(p.len(), 3);
        assert!(!pinned.contains(&p[2]));
        // More pinned than replicas: all pinned, nothing else.
        let many = [NodeRow(7), NodeRow(1), NodeRow(9)];
        assert_eq!(plan_one(&blob(b), 0, 2, true, &many, &candidates).as_slice(), &many);
    }
    let small = cluster(5, 3);
    for spread in [false, true] {
        let p = plan_one(&blob(1), 0, 8, spread, &[], &small);
        let mut rows: Vec<u32> = p.iter().map(|n| n.0).collect();
        rows.sort_unstable();
        assert_eq!(rows, [0, 1, 2, 3, 4]);
        assert_eq!(plan_one(&blob(1), 0, 8, spread, &[NodeRow(2)], &small).len(), 5);
    }
    // Bad weights are never chosen, even when that leaves the plan short.
    let mut bad = cluster(6, 2);
    for (c, w) in bad.iter_mut().zip([0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY]) {
        c.weight = w;
    }
    for b in 0..200 {
        assert_eq!(plan_one(&blob(b), 0, 3, b % 2 == 0, &[], &bad).as_slice(), &[NodeRow(5)]);
    }
    assert!(plan_one(&blob(0), 0, 3, true, &[], &[]).is_empty());
    assert!(plan_one(&blob(0), 0, 0, true, &[], &candidates).is_empty());
}

#[test]
fn twice_the_capacity_gets_twice_the_primaries() {
    // Ten nodes of 2 GiB and ten of 1 GiB, all cool: 2/3 of primaries go to the big ones.
    let candidates: Vec<Candidate> =
        (0..20).map(|row| node(row, 3, weight(if row % 2 == 0 { 2 * GIB } else { GIB }, 100))).collect();
    let mut primaries = [0usize; 20];
    for p in plan_all(&candidates, 3, true, &vec![0; BLOBS]) {
        primaries[p[0].0 as usize] += 1;
    }
    let big: usize = primaries.iter().step_by(2).sum();
    let small: usize = primaries.iter().skip(1).step_by(2).sum();
    let ratio = big as f64 / small as f64;
    assert!((ratio - 2.0).abs() < 0.3, "big {big} small {small} ratio {ratio}");
    // A hot node (weight / 4) gets about a quarter of its cool share.
    let mut hot = cluster(20, 0);
    hot[0].weight = weight(GIB, 900) / weight(GIB, 0);
    let hot_primaries = plan_all(&hot, 1, false, &vec![0; BLOBS]).iter().filter(|p| p[0] == NodeRow(0)).count();
    let expected = BLOBS as f64 * 0.25 / 19.25;
    assert!((hot_primaries as f64 - expected).abs() < expected * 0.3, "{hot_primaries} vs {expected}");
}

#[test]
fn equal_weights_spread_copies_evenly() {
    let candidates = cluster(100, 3);
    for spread in [false, true] {
        let mut counts = [0usize; 100];
        for p in plan_all(&candidates, 3, spread, &vec![0; BLOBS]) {
            assert_eq!(p.len(), 3);
            for n in p {
                counts[n.index()] += 1;
            }
        }
        let mean = (BLOBS * 3) as f64 / 100.0;
        let (min, max) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
        assert!(min as f64 > mean * 0.75 && (max as f64) < mean * 1.25, "spread {spread}: {min}..{max}, mean {mean}");
    }
}
