//! The safety gates: what may hold an action back, with a stable name each.
//!
//! Invariant: a blob held by a gate records the gate and when it opens
//! (`blobs.held_by`, `blobs.held_until_ms`; 0 means "when capacity frees") and is
//! flagged `waiting`, so reconcile looks at it again when that gate can have opened.

/// Why an action was not emitted (stored as its `u8` code in the state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Gate {
    None = 0,
    /// The cluster-wide in-flight move budget is used up.
    MoveBudget = 1,
    /// The target or source node's in-flight move budget is used up.
    NodeBudget = 2,
    /// The blob is backing off after failed pulls.
    Backoff = 3,
    /// The throttle window's move allowance is used up.
    Throttle = 4,
    /// The new copy has not been healthy for the stabilisation period yet.
    Stabilisation = 5,
    /// The mass-failure brake holds repairs of copies lost on nodes that just went down.
    Brake = 6,
    /// Global backpressure: only repairs of under-replicated blobs go out.
    Backpressure = 7,
    /// No healthy copy is left to pull from (waiting for a holder to come back).
    NoSource = 8,
    /// The verification budget is used up.
    VerifyBudget = 9,
    /// The drop budget is used up.
    DropBudget = 10,
    /// The pass already emitted `actions_per_pass_max` actions.
    PassFull = 11,
}

pub const GATE_NAMES: [&str; 12] = [
    "none",
    "move_budget",
    "node_budget",
    "backoff",
    "throttle",
    "stabilisation",
    "brake",
    "backpressure",
    "no_source",
    "verify_budget",
    "drop_budget",
    "pass_full",
];

impl Gate {
    pub fn name(self) -> &'static str {
        GATE_NAMES[self as usize]
    }

    pub fn from_code(code: u8) -> Gate {
        match code {
            1 => Gate::MoveBudget,
            2 => Gate::NodeBudget,
            3 => Gate::Backoff,
            4 => Gate::Throttle,
            5 => Gate::Stabilisation,
            6 => Gate::Brake,
            7 => Gate::Backpressure,
            8 => Gate::NoSource,
            9 => Gate::VerifyBudget,
            10 => Gate::DropBudget,
            11 => Gate::PassFull,
            _ => Gate::None,
        }
    }
}
