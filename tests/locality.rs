//! Vivaldi coordinates: on a synthetic plane-plus-height latency matrix they predict
//! every pair's RTT (measured or not) within 15 % median error; updates are
//! bit-for-bit deterministic; coincident nodes separate deterministically; bad
//! samples change nothing; and no input, however extreme, makes a coordinate
//! non-finite or breaks its bounds.

use meshos::locality::{
    median_relative_error, predict_us, update, Coordinate, VivaldiConfig, COORDINATE_LIMIT_US, ERROR_MIN, RTT_MAX_US,
};
use meshos::sim::rng::Rng;
use proptest::prelude::*;

const NODES: usize = 100;
const PEERS_PER_ROUND: usize = 8;
const ROUNDS: usize = 60;
/// Each sample is the true RTT times a factor uniform in `1 ± NOISE`.
const NOISE: f64 = 0.05;

/// A value uniform in [0, 1).
fn unit(rng: &mut Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// The ground truth: each node a point in the plane and an access delay.
struct Truth {
    x_us: Vec<f64>,
    y_us: Vec<f64>,
    height_us: Vec<f64>,
}

impl Truth {
    fn new(rng: &mut Rng, nodes: usize) -> Truth {
        let mut truth = Truth { x_us: Vec::new(), y_us: Vec::new(), height_us: Vec::new() };
        for _ in 0..nodes {
            truth.x_us.push(unit(rng) * 100_000.0);
            truth.y_us.push(unit(rng) * 100_000.0);
            truth.height_us.push(100.0 + unit(rng) * 1_900.0);
        }
        truth
    }

    fn rtt_us(&self, a: usize, b: usize) -> f64 {
        let dx = self.x_us[a] - self.x_us[b];
        let dy = self.y_us[a] - self.y_us[b];
        (dx * dx + dy * dy).sqrt() + self.height_us[a] + self.height_us[b]
    }

    fn all_pairs(&self) -> Vec<(usize, usize, f64)> {
        let nodes = self.x_us.len();
        (0..nodes).flat_map(|a| (a + 1..nodes).map(move |b| (a, b))).map(|(a, b)| (a, b, self.rtt_us(a, b))).collect()
    }
}

/// Runs `rounds` rounds in which every node measures `PEERS_PER_ROUND` random peers
/// (noisy samples) and updates only its own coordinate; calls `after_round` with the
/// round number (from 1) and the coordinates after each round.
fn simulate(seed: u64, rounds: usize, mut after_round: impl FnMut(usize, &[Coordinate])) -> Vec<Coordinate> {
    let config = VivaldiConfig::default();
    let mut rng = Rng::new(seed);
    let truth = Truth::new(&mut rng, NODES);
    let mut coordinates = vec![Coordinate::ORIGIN; NODES];
    for round in 1..=rounds {
        for node in 0..NODES {
            for _ in 0..PEERS_PER_ROUND {
                let peer = (node + 1 + rng.below(NODES as u64 - 1) as usize) % NODES;
                let sample_us = truth.rtt_us(node, peer) * (1.0 + NOISE * (2.0 * unit(&mut rng) - 1.0));
                let remote = coordinates[peer];
                assert!(update(&mut coordinates[node], node as u32, &remote, peer as u32, sample_us, &config));
            }
        }
        after_round(round, &coordinates);
    }
    coordinates
}

#[test]
fn predicts_all_pairs_within_15_percent_median_error() {
    for seed in [1, 2, 3, 0x5eed_1234] {
        let truth = Truth::new(&mut Rng::new(seed), NODES);
        let pairs = truth.all_pairs();
        let mut first_under_15 = None;
        let coordinates = simulate(seed, ROUNDS, |round, coordinates| {
            if first_under_15.is_none() && median_relative_error(coordinates, &pairs) < 0.15 {
                first_under_15 = Some(round);
            }
        });
        let error = median_relative_error(&coordinates, &pairs);
        println!(
            "seed {seed:#x}: median relative error {:.2} % over {} pairs after {ROUNDS} rounds \
             ({PEERS_PER_ROUND} peers per node per round); first under 15 % at round {first_under_15:?}",
            error * 100.0,
            pairs.len()
        );
        assert!(error < 0.15, "seed {seed:#x}: median relative error {error} after {ROUNDS} rounds");
    }
}

fn bits(c: &Coordinate) -> [u64; 4] {
    [c.x_us.to_bits(), c.y_us.to_bits(), c.height_us.to_bits(), c.error.to_bits()]
}

#[test]
fn same_updates_give_bit_identical_coordinates() {
    let seed = 42;
    println!("seed {seed}");
    let first = simulate(seed, 10, |_, _| {});
    let second = simulate(seed, 10, |_, _| {});
    let all_bits = |coordinates: &[Coordinate]| coordinates.iter().map(bits).collect::<Vec<_>>();
    assert_eq!(all_bits(&first), all_bits(&second));
    assert_ne!(all_bits(&first), all_bits(&simulate(seed + 1, 10, |_, _| {})), "another seed moves nodes elsewhere");
}

#[test]
fn coincident_nodes_move_apart_deterministically() {
    let config = VivaldiConfig::default();
    let run = || {
        let mut a = Coordinate::ORIGIN;
        let mut b = Coordinate::ORIGIN;
        for _ in 0..20 {
            let remote = b;
            assert!(update(&mut a, 7, &remote, 9, 5_000.0, &config));
            let remote = a;
            assert!(update(&mut b, 9, &remote, 7, 5_000.0, &config));
        }
        (a, b)
    };
    let (a, b) = run();
    let (again_a, again_b) = run();
    assert_eq!([bits(&again_a), bits(&again_b)], [bits(&a), bits(&b)], "the same ids give the same motion");
    let predicted_us = predict_us(&a, &b);
    assert!((predicted_us - 5_000.0).abs() < 500.0, "two nodes alone converge on their RTT: {predicted_us}");

    // The first step of each node from a shared point goes in opposite directions.
    let mut a = Coordinate::ORIGIN;
    let mut b = Coordinate::ORIGIN;
    update(&mut a, 7, &Coordinate::ORIGIN, 9, 5_000.0, &config);
    update(&mut b, 9, &Coordinate::ORIGIN, 7, 5_000.0, &config);
    assert!(a.x_us != 0.0 || a.y_us != 0.0);
    assert_eq!(a.x_us.to_bits(), (-b.x_us).to_bits());
    assert_eq!(a.y_us.to_bits(), (-b.y_us).to_bits());
    // Another pair of ids picks another direction.
    let mut c = Coordinate::ORIGIN;
    update(&mut c, 7, &Coordinate::ORIGIN, 10, 5_000.0, &config);
    assert_ne!((c.x_us.to_bits(), c.y_us.to_bits()), (a.x_us.to_bits(), a.y_us.to_bits()));
}

#[test]
fn bad_samples_and_bad_remotes_change_nothing() {
    let config = VivaldiConfig::default();
    let local = Coordinate { x_us: 1_000.0, y_us: -2_000.0, height_us: 50.0, error: 0.4 };
    let remote = Coordinate { x_us: 5_000.0, y_us: 3_000.0, height_us: 80.0, error: 0.6 };
    for rtt_us in
        [0.0, -0.0, -1.0, -5_000.0, f64::NAN, -f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 10_000_001.0, 1e300]
    {
        let mut moved = local;
        assert!(!update(&mut moved, 1, &remote, 2, rtt_us, &config), "sample {rtt_us} accepted");
        assert_eq!(bits(&moved), bits(&local), "sample {rtt_us} changed the coordinate");
    }
    let bad_remotes = [
        Coordinate { x_us: f64::NAN, ..remote },
        Coordinate { y_us: f64::INFINITY, ..remote },
        Coordinate { x_us: 2.0 * COORDINATE_LIMIT_US, ..remote },
        Coordinate { height_us: -1.0, ..remote },
        Coordinate { height_us: f64::NAN, ..remote },
        Coordinate { error: 0.0, ..remote },
        Coordinate { error: 2.0, ..remote },
        Coordinate { error: f64::NAN, ..remote },
    ];
    for bad in bad_remotes {
        let mut moved = local;
        assert!(!update(&mut moved, 1, &bad, 2, 5_000.0, &config), "remote {bad:?} accepted");
        assert_eq!(bits(&moved), bits(&local));
    }
    // The boundary sample is accepted.
    let mut moved = local;
    assert!(update(&mut moved, 1, &remote, 2, RTT_MAX_US, &config));
    assert_ne!(moved, local);
}

#[test]
fn median_relative_error_of_known_predictions() {
    let a = Coordinate { x_us: 0.0, y_us: 0.0, height_us: 10.0, error: 1.0 };
    let b = Coordinate { x_us: 300.0, y_us: 400.0, height_us: 10.0, error: 1.0 };
    assert_eq!(predict_us(&a, &b), 520.0);
    let coordinates = [a, b];
    assert_eq!(median_relative_error(&coordinates, &[(0, 1, 520.0)]), 0.0);
    assert_eq!(median_relative_error(&coordinates, &[(0, 1, 400.0), (0, 1, 520.0), (1, 0, 1040.0)]), 0.3);
    assert_eq!(median_relative_error(&coordinates, &[(0, 1, 400.0), (0, 1, 1040.0)]), (0.3 + 0.5) / 2.0);
    assert!(median_relative_error(&coordinates, &[]).is_nan());
}

/// Any `f64`, weighted towards the edges: zero, subnormals, huge, NaN, infinities.
fn any_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(0.0),
        Just(5e-324),
        Just(1e300),
        Just(-f64::MAX),
        Just(f64::NAN),
        Just(f64::INFINITY),
        -1e10..1e10f64,
        any::<f64>(),
    ]
}

/// A value in `low..=high`, often one of its ends or a tiny step off them.
fn in_bounds(low: f64, high: f64) -> impl Strategy<Value = f64> {
    prop_oneof![Just(low), Just(high), Just(low + (high - low) * 1e-12), low..=high]
}

/// A remote coordinate: usually valid but extreme (at the bounds, far away, sure or
/// unsure of itself), sometimes any bits at all.
fn any_remote() -> impl Strategy<Value = Coordinate> {
    let config = VivaldiConfig::default();
    let valid = (
        in_bounds(-COORDINATE_LIMIT_US, COORDINATE_LIMIT_US),
        in_bounds(-COORDINATE_LIMIT_US, COORDINATE_LIMIT_US),
        in_bounds(config.height_min_us, COORDINATE_LIMIT_US),
        in_bounds(ERROR_MIN, config.error_max),
    )
        .prop_map(|(x_us, y_us, height_us, error)| Coordinate { x_us, y_us, height_us, error });
    let arbitrary = (any_f64(), any_f64(), any_f64(), any_f64())
        .prop_map(|(x_us, y_us, height_us, error)| Coordinate { x_us, y_us, height_us, error });
    prop_oneof![4 => valid, 1 => Just(Coordinate::ORIGIN), 1 => arbitrary]
}

/// An RTT sample: usually in range (tiny, the 10 s bound, anything between), sometimes any bits.
fn any_rtt_us() -> impl Strategy<Value = f64> {
    prop_oneof![4 => in_bounds(5e-324, RTT_MAX_US), 1 => any_f64()]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Whatever the remote coordinate, ids and sample, the local coordinate keeps its
    /// bounds, and a refused update leaves it bit-for-bit unchanged.
    #[test]
    fn coordinates_stay_valid_under_extreme_inputs(
        samples in proptest::collection::vec((any_remote(), any::<u32>(), any_rtt_us()), 1..32)
    ) {
        let config = VivaldiConfig::default();
        let mut local = Coordinate::ORIGIN;
        for (remote, remote_id, rtt_us) in samples {
            let before = local;
            let accepted = update(&mut local, 3, &remote, remote_id, rtt_us, &config);
            prop_assert!(local.is_valid(&config), "{local:?} after {remote:?} {rtt_us}");
            prop_assert!(local.x_us.is_finite() && local.y_us.is_finite() && local.height_us.is_finite());
            prop_assert!(local.error > 0.0 && local.error <= config.error_max);
            prop_assert_eq!(accepted, rtt_us > 0.0 && rtt_us <= RTT_MAX_US && remote.is_valid(&config));
            if !accepted {
                prop_assert_eq!(bits(&before), bits(&local));
            }
        }
    }
}
