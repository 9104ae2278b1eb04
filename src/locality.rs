//! Vivaldi network coordinates with height (Dabek et al., SIGCOMM 2004), so a node
//! can predict the round-trip time to any peer from coordinates alone, including
//! peers it has never measured.
//!
//! Each node keeps a [`Coordinate`]: a point in a 2-D plane plus a non-negative
//! height (the access-link delay every path to the node pays), all in microseconds,
//! and an error estimate. The predicted RTT between two nodes is their distance in
//! the plane plus both heights. [`update`] moves the local coordinate along the
//! height-vector unit direction by `cc * weight * (rtt - predicted)`, where `weight
//! = local.error / (local.error + remote.error)` (the adaptive timestep), and folds
//! the sample's relative error into the local error as an EWMA with gain `ce *
//! weight`. No gravity term is applied (like the paper; Serf adds one).
//!
//! Invariants, asserted: a coordinate held by a node is finite, each plane component
//! lies within `±COORDINATE_LIMIT_US`, its height within `[height_min_us,
//! COORDINATE_LIMIT_US]`, its error within `[ERROR_MIN, error_max]`. The remote
//! coordinate and the RTT sample are untrusted input: a non-positive, non-finite or
//! absurd (> 10 s) sample, or a remote coordinate that breaks these bounds, is
//! ignored and changes nothing. Every operation is an IEEE-754 basic operation or
//! `f64::sqrt` (correctly rounded), so the same updates give bit-identical
//! coordinates on every platform; there is no randomness (coincident coordinates
//! are pushed apart along a direction derived from the two node ids) and no
//! allocation per update.

/// The largest RTT sample accepted: anything above 10 s is a broken measurement.
pub const RTT_MAX_US: f64 = 10_000_000.0;
/// Positive samples below 1 µs are raised to 1 µs before use (as Serf does), so the
/// relative error of a sample never divides by a vanishing RTT.
pub const RTT_MIN_US: f64 = 1.0;
/// Bound on each plane component and on the height. It is 100 times [`RTT_MAX_US`],
/// so honest coordinates never reach it, and squares of differences stay far from
/// overflow.
pub const COORDINATE_LIMIT_US: f64 = 1_000_000_000.0;
/// The smallest local error: a node never becomes so sure of itself that it stops
/// moving.
pub const ERROR_MIN: f64 = 0.001;
/// Plane distance at or below which two coordinates count as coincident and the
/// id-derived direction replaces the (undefined) direction between them.
pub const COINCIDENT_DISTANCE_US: f64 = 0.001;

/// A node's position in the latency space, with its confidence.
#[derive(Debug, Clone, Copy, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Coordinate {
    pub x_us: f64,
    pub y_us: f64,
    pub height_us: f64,
    /// local error estimate in (0, 1.5]
    pub error: f64,
}

impl Coordinate {
    /// the initial coordinate of a new node (error 1.0, a small non-zero height)
    pub const ORIGIN: Coordinate = Coordinate { x_us: 0.0, y_us: 0.0, height_us: 10.0, error: 1.0 };

    /// True if the coordinate is finite and within the module's bounds for `config`
    /// (the invariant every held coordinate keeps; remote coordinates are checked
    /// against it before use).
    pub fn is_valid(&self, config: &VivaldiConfig) -> bool {
        let plane_ok = |value: f64| value.is_finite() && value.abs() <= COORDINATE_LIMIT_US;
        plane_ok(self.x_us)
            && plane_ok(self.y_us)
            && self.height_us.is_finite()
            && self.height_us >= config.height_min_us
            && self.height_us <= COORDINATE_LIMIT_US
            && self.error.is_finite()
            && self.error >= ERROR_MIN
            && self.error <= config.error_max
    }
}

/// Tuning of the Vivaldi update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VivaldiConfig {
    /// Gain of the error EWMA (the paper's `ce`).
    pub ce: f64,
    /// Gain of the coordinate move (the paper's `cc`).
    pub cc: f64,
    /// The height never drops below this (Serf: 10 µs).
    pub height_min_us: f64,
    /// The error never rises above this (Serf: 1.5).
    pub error_max: f64,
}

impl Default for VivaldiConfig {
    /// The paper's and Serf's values: `ce = cc = 0.25`, height floor 10 µs, error cap 1.5.
    fn default() -> VivaldiConfig {
        VivaldiConfig { ce: 0.25, cc: 0.25, height_min_us: 10.0, error_max: 1.5 }
    }
}

impl VivaldiConfig {
    /// True if the gains lie in (0, 1], the height floor is positive and no more than
    /// the origin's height, and the error cap admits the origin's error.
    pub fn is_valid(&self) -> bool {
        self.ce > 0.0
            && self.ce <= 1.0
            && self.cc > 0.0
            && self.cc <= 1.0
            && self.height_min_us > 0.0
            && self.height_min_us <= Coordinate::ORIGIN.height_us
            && self.error_max >= Coordinate::ORIGIN.error
            && self.error_max.is_finite()
    }
}

/// Predicted RTT between two coordinates in microseconds: Euclidean distance in the plane plus both heights.
pub fn predict_us(a: &Coordinate, b: &Coordinate) -> f64 {
    plane_distance_us(a.x_us - b.x_us, a.y_us - b.y_us) + a.height_us + b.height_us
}

fn plane_distance_us(dx_us: f64, dy_us: f64) -> f64 {
    (dx_us * dx_us + dy_us * dy_us).sqrt()
}

/// One Vivaldi update of `local` (node `local_id`) from a measured RTT to `remote` (node `remote_id`); the ids only break ties when the coordinates coincide. Ignores (returns false) non-positive or absurd samples (> 10 s) without changing anything.
///
/// A remote coordinate that is not finite or breaks the bounds of
/// [`Coordinate::is_valid`] is ignored the same way. `local` must be valid and
/// `config` must be valid (both asserted).
pub fn update(
    local: &mut Coordinate,
    local_id: u32,
    remote: &Coordinate,
    remote_id: u32,
    rtt_us: f64,
    config: &VivaldiConfig,
) -> bool {
    assert!(config.is_valid(), "invalid VivaldiConfig {config:?}");
    assert!(local.is_valid(config), "invalid local coordinate {local:?}");
    // Positive tests under one negation, so a NaN sample is refused too.
    let sample_ok = rtt_us > 0.0 && rtt_us <= RTT_MAX_US;
    if !(sample_ok && remote.is_valid(config)) {
        return false;
    }
    let rtt_us = if rtt_us < RTT_MIN_US { RTT_MIN_US } else { rtt_us };

    let dx_us = local.x_us - remote.x_us;
    let dy_us = local.y_us - remote.y_us;
    let plane_us = plane_distance_us(dx_us, dy_us);
    let heights_us = local.height_us + remote.height_us;
    let predicted_us = plane_us + heights_us;

    // Adaptive timestep: a node sure of itself (low error) relative to an unsure peer
    // moves little; both errors are at least ERROR_MIN, so the sum is positive.
    let weight = local.error / (local.error + remote.error);
    let sample_error = (predicted_us - rtt_us).abs() / rtt_us;
    let gain = config.ce * weight;
    let error = (gain * sample_error + (1.0 - gain) * local.error).clamp(ERROR_MIN, config.error_max);

    // Positive force pushes away from the remote (the prediction is too short).
    let force_us = config.cc * weight * (rtt_us - predicted_us);
    let (x_us, y_us, height_us) = if plane_us > COINCIDENT_DISTANCE_US {
        // The height-vector model: [x, h] - [y, g] = [x - y, h + g] with norm
        // |x - y| + h + g, so the unit vector splits the move between plane and
        // height in proportion to each part of the prediction.
        let plane_share = force_us / predicted_us;
        (local.x_us + dx_us * plane_share, local.y_us + dy_us * plane_share, local.height_us + heights_us * plane_share)
    } else {
        // Coincident in the plane: no direction to move along, so take one derived
        // from the ids (opposite for the two nodes) and move the whole force in the
        // plane, as the paper's random direction would; the height stays.
        let (unit_x, unit_y) = tie_break_direction(local_id, remote_id);
        (local.x_us + unit_x * force_us, local.y_us + unit_y * force_us, local.height_us)
    };

    local.x_us = x_us.clamp(-COORDINATE_LIMIT_US, COORDINATE_LIMIT_US);
    local.y_us = y_us.clamp(-COORDINATE_LIMIT_US, COORDINATE_LIMIT_US);
    local.height_us = height_us.clamp(config.height_min_us, COORDINATE_LIMIT_US);
    local.error = error;
    assert!(local.is_valid(config), "update broke the coordinate invariant: {local:?}");
    true
}

/// A unit vector in the plane fixed by the unordered pair of ids, negated for the
/// node with the larger id, so two coincident nodes move in opposite directions.
fn tie_break_direction(local_id: u32, remote_id: u32) -> (f64, f64) {
    let (low, high) = if local_id <= remote_id { (local_id, remote_id) } else { (remote_id, local_id) };
    let mut state = ((low as u64) << 32) | high as u64;
    // Rejection sampling on the square [-1, 1)^2 keeps only points whose norm is
    // comfortably non-zero; a few draws nearly always suffice, the axis is a bound.
    let mut direction = (1.0, 0.0);
    for _ in 0..8 {
        state = mix64(state);
        let u = unit_interval(state) * 2.0 - 1.0;
        state = mix64(state);
        let v = unit_interval(state) * 2.0 - 1.0;
        let norm = (u * u + v * v).sqrt();
        if norm > 0.125 && norm <= 1.0 {
            direction = (u / norm, v / norm);
            break;
        }
    }
    if local_id <= remote_id {
        direction
    } else {
        (-direction.0, -direction.1)
    }
}

/// The SplitMix64 finaliser: a fixed bijective scramble of the id pair (not randomness).
fn mix64(value: u64) -> u64 {
    let mut z = value.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The top 53 bits as a value in [0, 1), exactly.
fn unit_interval(value: u64) -> f64 {
    (value >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Median relative error |predicted - actual| / actual over the given pairs (a test and reporting helper; it may allocate).
///
/// Each pair is `(index_a, index_b, actual_rtt_us)` with a positive actual RTT; the
/// median of an even count is the mean of the middle two; no pairs give NaN.
pub fn median_relative_error(coordinates: &[Coordinate], pairs: &[(usize, usize, f64)]) -> f64 {
    let mut errors: Vec<f64> = pairs
        .iter()
        .map(|&(a, b, actual_us)| {
            assert!(actual_us > 0.0 && actual_us.is_finite(), "actual RTT must be positive, got {actual_us}");
            (predict_us(&coordinates[a], &coordinates[b]) - actual_us).abs() / actual_us
        })
        .collect();
    if errors.is_empty() {
        return f64::NAN;
    }
    errors.sort_unstable_by(f64::total_cmp);
    let middle = errors.len() / 2;
    if errors.len() % 2 == 1 {
        errors[middle]
    } else {
        (errors[middle - 1] + errors[middle]) / 2.0
    }
}
