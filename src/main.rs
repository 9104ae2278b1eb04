//! The `meshos` binary: parse flags into a `Config` and options, call the library,
//! print. Everything it does lives in the library; `anyhow` lives only here.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use meshos::admin;
use meshos::config::{Config, FsyncPolicy};
use meshos::event::AdminCommand;
use meshos::logtool::{self, Progress};
use meshos::sim;
use meshos::sim::cluster::SimOptions;
use meshos::sim::gen::GenOptions;
use meshos::state::hash::hash_hex;
use meshos::state::rejections::REJECT_REASON_NAMES;

#[derive(Parser)]
#[command(
    name = "meshos",
    version,
    about = "MeshOS: the deterministic behaviour layer of a cluster",
    long_about = "MeshOS folds one totally ordered event log into cluster state and, from it, decides \
                  what every node must do. Every decision is a pure function of the log, so any node \
                  (or you, with `meshos log replay`) reaches the same state hash at the same position.",
    after_help = "Start here:\n  meshos log gen --out /tmp/meshlog --seed 1 --nodes 50 --blobs 10000 --replicas 3 --events 1000000\n  \
                  meshos log replay /tmp/meshlog\n  meshos log verify /tmp/meshlog"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node: ingest over TCP and the local socket, daemons over the SDK socket,
    /// the embedded log, fold, reconcile and the executors, until SIGTERM or Ctrl-C.
    ///
    /// At start the node replays its log (DATA_DIR/log) to the state it had, then
    /// listens on `[ingest] listen_tcp`, the local and the SDK sockets, and writes the bound TCP
    /// address to DATA_DIR/node.addr. Every client frame becomes one log record;
    /// records are committed in groups with one fsync, acknowledged once durable, then
    /// folded and reconciled. On SIGTERM it stops accepting, drains every queue,
    /// commits, fsyncs and exits 0. Daemon actions run real processes (each in its own
    /// process group, output in DATA_DIR/daemons/NAME/); every action addressed to the
    /// node is listed in DATA_DIR/dispatched.log; blob actions move bytes between the
    /// nodes' peer ports (DATA_DIR/blobs).
    /// SIGTERM stops the node's daemons first; a restart after a crash stops what the
    /// previous run left running.
    #[command(after_help = "Example:
  meshos config default > node.toml   # edit name and data_dir
                    meshos node --config node.toml

Log level: `log_level` in the file, or RUST_LOG                   (`debug`, or per target: `meshos=debug,warn`).")]
    Node {
        /// The node's TOML config file (see `meshos config default`).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Work with an event log directory (generate, replay, verify).
    #[command(subcommand)]
    Log(LogCommand),
    /// Print or check a node config file (TOML).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Cluster setup: a new cluster's genesis, node keys and operator key.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Operator commands, signed with your ed25519 key and sent through the log.
    ///
    /// Every admin command is an event in the log, in a section signed with an
    /// operator's key for this cluster and valid for 10 minutes: nodes apply only
    /// sections signed by a key in the cluster keyring, each once. The keyring starts
    /// from the cluster's genesis (`meshos cluster init`, or a single node's first
    /// start, which writes DATA_DIR/admin.key) and changes only by a signed
    /// `set-keyring` (key rotation). Anything else is rejected, with its reason, in
    /// the state (`meshos log replay --show-rejections`).
    ///
    /// Keys: `--key FILE` (default: the node's DATA_DIR/admin.key). `meshos admin
    /// keygen --out FILE` writes a new key file (the secret seed as 64 hex characters,
    /// mode 0600; a file others can read is refused) and prints its public key.
    ///
    /// Nodes: `admit-node NAME --node-key HEX` lets a node's key sign its records
    /// (its public key is in its log at first start, and `meshos admin public-key
    /// --key DATA_DIR/node.key` prints it); `remove-node NAME` revokes it and marks the
    /// node left.
    ///
    /// Every command reads the node's config (--config) for its name, log and socket.
    /// Without --dry-run it sends the signed event to that node over its local Unix
    /// socket, waits until it is durable, then reads the log back to say whether it
    /// was applied or rejected. With --dry-run nothing is sent or written: the log is
    /// read (without the node's lock) and replayed, the event is applied to a copy of
    /// the state, and what would happen is printed: applied or the rejection reason,
    /// the actions of the reconcile pass, and for enter-maintenance, drain and
    /// drop-replicas the copies that must move first, the blobs left at their intent,
    /// the expected time to safe and the daemons that stop.
    #[command(
        subcommand,
        after_help = "Example:
  meshos admin enter-maintenance node-7 --key ~/.meshos/ops.key --config node.toml --dry-run
  meshos admin enter-maintenance node-7 --key ~/.meshos/ops.key --config node.toml
  meshos admin admit-node node-9 --node-key <HEX from node-9's log> --key ~/.meshos/ops.key --config node.toml"
    )]
    Admin(AdminCommandLine),
    /// Declare daemons the cluster runs (daemon intents, through the log).
    ///
    /// `apply` reads a daemon spec file (TOML: name, command, args, env, working_dir,
    /// essential, health_timeout_ms, stop_grace_ms, [restart] policy, runs_on) and
    /// appends it as a daemon intent through the node named by --config; every node
    /// the spec places it on starts it, restarts it on crashes (with backoff, and a
    /// crash-loop gate) and stops it when it is removed. Applying a changed spec
    /// replaces it (running daemons are told to reload their config). `remove` stops it
    /// everywhere. The daemon's output: DATA_DIR/daemons/NAME/{stdout,stderr}.log.
    #[command(
        subcommand,
        after_help = "Example:
  cat > cache.toml <<EOF
  name = \"cache\"
  command = \"/usr/local/bin/cache-daemon\"
  health_timeout_ms = 30000
  runs_on = { label = \"ssd\" }
  EOF
  meshos daemon apply cache.toml --config node.toml
  meshos daemon remove cache --config node.toml"
    )]
    Daemon(DaemonCommandLine),
    /// A whole cluster on this machine, in one process: N nodes on one log.
    ///
    /// Each node has its own data directory, blob store, peer port, SDK socket and
    /// supervised daemons; they share node-1's embedded log, and move blob bytes
    /// between their peer ports for real. The first start installs a keyring (the
    /// operator key is written to DIR/node-1/admin.key), a `worker` daemon on every node and
    /// a few dozen blobs at 3 replicas on node-1 (the other copies arrive by pulls).
    /// It prints how to reach it and what to try. Ctrl-C stops it; run it again on the
    /// same --dir to resume from its log.
    #[command(after_help = "Example:
  meshos demo --nodes 5
  meshos demo --dir ./demo --nodes 3 --blobs 10")]
    Demo {
        /// How many nodes (1..=16).
        #[arg(long, default_value_t = 5)]
        nodes: u32,
        /// Where the nodes keep their data (default: $TMPDIR/meshos-demo).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Blobs stored at the first start.
        #[arg(long, default_value_t = 36)]
        blobs: u32,
        /// Bytes of each seeded blob.
        #[arg(long, default_value_t = 256 * 1024)]
        blob_bytes: u32,
    },
    /// The demo's worker daemon (run by a node, not by hand): registers through the
    /// SDK, reports health and load every second, stops on a control event.
    #[command(hide = true)]
    DemoWorker,
    /// Store a file as a blob on the node and ask for K replicas of it.
    ///
    /// The file is hashed (blake3) and stored in the node's blob store (DATA_DIR/blobs:
    /// temporary file, fsync, rename), then the node appends three events of its own:
    /// the blob exists, it holds a healthy copy, and the placement intent (K copies,
    /// spread over zones if asked). Reconcile then places the other copies; every node
    /// that should hold one fetches it from a holder's peer port and checks its hash
    /// before it counts. Prints the blob id (64 hex characters).
    #[command(after_help = "Example:
  meshos put ./model.bin --replicas 3 --config node.toml
  meshos get <BLOB_ID> -o ./model.copy --config node.toml")]
    Put {
        /// The file to store.
        file: PathBuf,
        /// Healthy copies wanted (1..=8).
        #[arg(long, default_value_t = 3)]
        replicas: u8,
        /// Spread the copies over distinct zones where possible.
        #[arg(long)]
        zone_spread: bool,
        #[command(flatten)]
        common: DaemonArgs,
    },
    /// Fetch a blob into a file: from this node's store, or from a node that holds it.
    ///
    /// The bytes are checked against the blob id before the file is written (a
    /// temporary file renamed into place).
    Get {
        /// The blob id (64 hex characters, as `meshos put` printed it).
        blob: String,
        /// Where to write it.
        #[arg(short = 'o', long = "out", value_name = "FILE")]
        out: PathBuf,
        /// The node: its config file or its data directory (`--dir`, or $MESHOS_DIR).
        #[arg(long, alias = "dir", env = "MESHOS_DIR", value_name = "NODE.toml | DIR")]
        config: PathBuf,
    },
    /// Read the behaviour snapshot a node writes for Deck.
    #[command(subcommand)]
    Snapshot(SnapshotCommandLine),
    /// The cluster as a node sees it: a table of nodes (zone, health, maintenance with
    /// drain progress, load, copies held, daemons running), then blobs away from their
    /// intent, actions in flight, the gates and failures.
    ///
    /// Read from the behaviour snapshot the node writes (`[snapshot]`, once a second by
    /// default), so it costs the node nothing; `-o json` gives one object for scripts.
    #[command(after_help = "Example:\n  meshos status --config node.toml\n  meshos status --config node.toml -o json")]
    Status {
        /// The node: its config file or its data directory (`--dir`, or $MESHOS_DIR).
        #[arg(long, alias = "dir", env = "MESHOS_DIR", value_name = "NODE.toml | DIR")]
        config: PathBuf,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Why a blob, node or daemon is in the state it is, the last actions about it,
    /// and what holds the next one back.
    ///
    /// Replays the node's log read-only (the same fold and passes the node ran, so the
    /// same decisions), keeping the last actions that concern the target.
    #[command(after_help = "Example:
  meshos explain <BLOB_ID> --config node.toml
  meshos explain node-3 --config node.toml
  meshos explain worker --config node.toml -o json")]
    Explain {
        /// A blob id (64 hex characters), a node name or a daemon name.
        target: String,
        /// The node: its config file or its data directory (`--dir`, or $MESHOS_DIR).
        #[arg(long, alias = "dir", env = "MESHOS_DIR", value_name = "NODE.toml | DIR")]
        config: PathBuf,
        /// How many of the last actions to show.
        #[arg(long, default_value_t = 10)]
        history: usize,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// `meshos status`, redrawn in the terminal every interval until Ctrl-C.
    Watch {
        /// The node: its config file or its data directory (`--dir`, or $MESHOS_DIR).
        #[arg(long, alias = "dir", env = "MESHOS_DIR", value_name = "NODE.toml | DIR")]
        config: PathBuf,
        /// Time between redraws, in ms.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
    },
    /// Simulate a cluster under faults and check reconcile's invariants after every pass.
    ///
    /// The simulator is every node's executor: it keeps the ground truth (which node
    /// really holds which blob, healthy or corrupt; which daemons run), folds each
    /// step's events (completions, heartbeats, RTT samples, inventory digests, injected
    /// faults) as one log record and runs an incremental reconcile pass. The first half
    /// of the steps injects faults (node crashes and rejoins, slow nodes, partitions,
    /// silently corrupted copies, failed and slow transfers, intent changes); in the
    /// second half every node comes back and the cluster must converge.
    ///
    /// Checked after every pass: no last healthy copy dropped (a), no move into an
    /// ineligible node (b), no copy counted that is not really there or was fenced (c),
    /// in-flight budgets (d), the state's own invariants (e); at the end: converged (f)
    /// and no thrash, moves <= 3 x needed + 100 (g). The run is a pure function of the
    /// flags: the same seed prints the same line. Exit code 1 on any violation or when
    /// the cluster did not converge.
    #[command(after_help = "Example:\n  meshos sim --seed 7 --nodes 200 --blobs 5000 --replicas 3 --steps 2000\n\n\
                  The last line is\n  sim: seed=<S> steps=<T> faults=<F> violations=<V> converged=<true|false> moves=<M> needed=<K>")]
    Sim {
        /// Seed of the simulation: the same seed and flags give the same run.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Nodes in the cluster (3..=10000).
        #[arg(long, default_value_t = 200)]
        nodes: u32,
        /// Blobs, each placed on --replicas nodes at the start.
        #[arg(long, default_value_t = 5000)]
        blobs: u32,
        /// Copies wanted per blob at the start (intent changes move it by one).
        #[arg(long, default_value_t = 3)]
        replicas: u8,
        /// Log records to simulate after setup (100..300 ms of log time each).
        #[arg(long, default_value_t = 2000)]
        steps: u32,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    /// Lines for people.
    Text,
    /// One JSON object, for scripts.
    Json,
}

#[derive(Args)]
struct LimitArgs {
    /// Largest frame (one log record) accepted, in bytes.
    #[arg(long, default_value_t = meshos::config::FRAME_BYTES_MAX_DEFAULT)]
    frame_bytes_max: u32,
    /// Size at which a log segment file is closed and a new one started, in bytes.
    #[arg(long, default_value_t = meshos::config::SEGMENT_BYTES_MAX_DEFAULT)]
    segment_bytes_max: u64,
    /// The cluster's genesis the log is folded with (default: DIR/genesis.toml, which
    /// `meshos log gen` writes; a node's log: pass its --config instead).
    #[arg(long, value_name = "FILE")]
    genesis: Option<PathBuf>,
}

impl LimitArgs {
    fn config(&self) -> Config {
        Config { frame_bytes_max: self.frame_bytes_max, segment_bytes_max: self.segment_bytes_max, ..Config::default() }
    }

    /// The limits with the genesis of the log in `dir` (--genesis, else DIR/genesis.toml).
    fn config_for(&self, dir: &std::path::Path) -> anyhow::Result<Config> {
        let path = self.genesis.clone().unwrap_or_else(|| dir.join("genesis.toml"));
        let genesis = if path.exists() || self.genesis.is_some() {
            meshos::trust::Genesis::load(&path)?
        } else {
            eprintln!(
                "warning: no genesis ({} or --genesis, or a node's --config): no key is trusted, every record will \
                 be refused",
                path.display()
            );
            meshos::trust::Genesis::none()
        };
        Ok(Config { genesis, ..self.config() })
    }
}

#[derive(Subcommand)]
enum AdminCommandLine {
    /// Write a new operator key file (mode 0600; refuses to overwrite) and print its public key.
    Keygen {
        /// The key file to create.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Print the public key of a key file (to put it in a keyring).
    PublicKey {
        /// The key file.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
    /// Drain NODE (its copies move elsewhere, non-essential daemons stop), then hold it
    /// in maintenance.
    EnterMaintenance {
        node: String,
        #[command(flatten)]
        common: AdminArgs,
    },
    /// Bring NODE back from maintenance (it needs a fresh capability and its daemons up).
    ExitMaintenance {
        node: String,
        #[command(flatten)]
        common: AdminArgs,
    },
    /// Cordon NODE and move every copy off it (daemons keep running).
    Drain {
        node: String,
        #[command(flatten)]
        common: AdminArgs,
    },
    /// No new copies on NODE; existing ones stay.
    Cordon {
        node: String,
        #[command(flatten)]
        common: AdminArgs,
    },
    /// Undo cordon and drain on NODE.
    Uncordon {
        node: String,
        #[command(flatten)]
        common: AdminArgs,
    },
    /// Restart every daemon on NODE, or everywhere with --all (opens crash-loop gates).
    #[command(group(clap::ArgGroup::new("target").required(true).args(["node", "all"])))]
    RestartDaemons {
        node: Option<String>,
        /// Every node.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        common: AdminArgs,
    },
    /// Clear the avoid mark of NODE, or of every node with --all.
    #[command(group(clap::ArgGroup::new("target").required(true).args(["node", "all"])))]
    ClearAvoid {
        node: Option<String>,
        /// Every node.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        common: AdminArgs,
    },
    /// Drop the copies NODE holds (of one blob with --blob). Refused for a blob's last
    /// healthy copy; for every copy of a node, reconcile keeps last copies.
    DropReplicas {
        node: String,
        /// Only this blob (64 hex characters).
        #[arg(long, value_name = "HEX")]
        blob: Option<String>,
        #[command(flatten)]
        common: AdminArgs,
    },
    /// Recompute placement of one blob (--blob) or of every blob.
    InvalidatePlacement {
        /// Only this blob (64 hex characters).
        #[arg(long, value_name = "HEX")]
        blob: Option<String>,
        #[command(flatten)]
        common: AdminArgs,
    },
    /// Replace the cluster keyring (key rotation): version = current + 1 (the genesis is
    /// version 1).
    ///
    /// List every key the new keyring holds (the keys you keep too); sign with a key of
    /// the current keyring. A key removed and added back later cannot replay what it
    /// signed before: every operator section expires and is applied once.
    SetKeyring {
        /// The new keyring version: the current one plus one (2 for the first rotation).
        #[arg(long)]
        version: u64,
        /// A public key of the new keyring (64 hex characters); repeat for each.
        #[arg(long = "public-key", value_name = "HEX", required = true)]
        public_keys: Vec<String>,
        #[command(flatten)]
        common: AdminArgs,
    },
    /// Admit node NAME with its public key: its signed records are folded from now
    /// on (a known name gets the new key: a reinstalled node).
    AdmitNode {
        name: String,
        /// The node's public key (64 hex characters): its log prints it at first start,
        /// `meshos admin public-key --key DATA_DIR/node.key` too.
        #[arg(long = "node-key", value_name = "HEX")]
        node_key: String,
        #[command(flatten)]
        common: AdminArgs,
    },
    /// Remove node NAME: its key is revoked (nothing it signs is folded again) and the
    /// node is marked left (its copies are made elsewhere, trimming stops waiting).
    RemoveNode {
        name: String,
        #[command(flatten)]
        common: AdminArgs,
    },
}

#[derive(Subcommand)]
enum DaemonCommandLine {
    /// Append a daemon spec file as a daemon intent.
    Apply {
        /// The spec file (TOML); `meshos daemon apply --help` shows the fields.
        spec: PathBuf,
        #[command(flatten)]
        common: DaemonArgs,
    },
    /// List daemon instances as the node's snapshot shows them: node, state, pid,
    /// health, load, starts and crashes, restart backoff and the crash-loop gate.
    Ls {
        /// The node: its config file or its data directory (`--dir`, or $MESHOS_DIR).
        #[arg(long, alias = "dir", env = "MESHOS_DIR", value_name = "NODE.toml | DIR")]
        config: PathBuf,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Remove a daemon: every node stops it (control event, SIGTERM, SIGKILL).
    Remove {
        /// The daemon's name.
        name: String,
        #[command(flatten)]
        common: DaemonArgs,
    },
}

#[derive(Args)]
struct DaemonArgs {
    /// The node: its config file or its data directory (`--dir`, or $MESHOS_DIR).
    #[arg(long, alias = "dir", env = "MESHOS_DIR", value_name = "NODE.toml | DIR")]
    config: PathBuf,
    /// The operator key that signs the intent (default: the node's DATA_DIR/admin.key).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// How long to wait for the node's acknowledgement, in ms.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

#[derive(Args)]
struct AdminArgs {
    /// Your operator key file (see `meshos admin keygen`; default: the node's
    /// DATA_DIR/admin.key, which a single node's first start writes).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// The node: its config file or its data directory (`--dir`, or $MESHOS_DIR).
    #[arg(long, alias = "dir", env = "MESHOS_DIR", value_name = "NODE.toml | DIR")]
    config: PathBuf,
    /// Who you are, recorded in the operator section (default: $USER@hostname).
    #[arg(long)]
    operator: Option<String>,
    /// Print what would happen and append nothing.
    #[arg(long)]
    dry_run: bool,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Copies to move listed in text output (all are counted; JSON lists all).
    #[arg(long, default_value_t = 20)]
    show: usize,
    /// How long to wait for the node's acknowledgement, in ms.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the documented default config: every field, its default and what it does.
    Default,
    /// Parse and check a config file; exit 1 naming the field and why if it is bad.
    Check {
        /// The config file.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Start a new cluster: its genesis (the operator keys and first nodes every node
    /// trusts, and so the cluster id), a key per node, and an operator key.
    ///
    /// Writes into DIR: `genesis.toml` (public: copy it to every node's data directory,
    /// or name it in `[cluster] genesis_file`), `NODE.key` for each --nodes name (secret:
    /// copy each to its node as DATA_DIR/node.key, mode 0600) and, unless
    /// --operator-key names yours, `admin.key` (secret: the operator key that signs
    /// admin commands). Nodes added later create their own key at first start and are
    /// admitted with `meshos admin admit-node`.
    #[command(after_help = "Example:
  meshos cluster init -o /etc/meshos/init --nodes node-1,node-2,node-3
  scp /etc/meshos/init/genesis.toml node-2:/var/lib/meshos/
  scp /etc/meshos/init/node-2.key node-2:/var/lib/meshos/node.key")]
    Init {
        /// The directory to write into (created; existing files are never replaced).
        #[arg(short = 'o', long, value_name = "DIR")]
        out: PathBuf,
        /// The first nodes, admitted from the start (comma-separated names).
        #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
        nodes: Vec<String>,
        /// An existing operator key file to trust instead of writing a new admin.key;
        /// repeat for more operators (any of them may sign).
        #[arg(long = "operator-key", value_name = "FILE")]
        operator_keys: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum LogCommand {
    /// Write a deterministic synthetic log of a cluster's life.
    ///
    /// Nodes join (capabilities, heartbeats), daemons are declared and started, blobs
    /// are announced with placement intents and replicated, then the cluster lives:
    /// heartbeats, replica churn and repair, RTT samples, daemon health and crashes,
    /// nodes going down and back, capability forks and admin commands. The same flags
    /// always give the same log, byte for byte.
    #[command(
        after_help = "Example:\n  meshos log gen --out /tmp/meshlog --seed 7 --nodes 100 --blobs 33334 --replicas 3 --events 1000000"
    )]
    Gen {
        /// Directory to write the log into (created; must not hold a log yet).
        #[arg(long)]
        out: PathBuf,
        /// Seed of the generator: the same seed and flags give the same log.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Nodes in the cluster.
        #[arg(long, default_value_t = 10)]
        nodes: u32,
        /// Blobs to announce and replicate.
        #[arg(long, default_value_t = 1000)]
        blobs: u32,
        /// Healthy copies wanted per blob (at most --nodes).
        #[arg(long, default_value_t = 3)]
        replicas: u8,
        /// Total events to write, setup included.
        #[arg(long, default_value_t = 100_000)]
        events: u64,
        /// Events per log record (one committed batch).
        #[arg(long, default_value_t = 512)]
        record_events: u32,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Fold every record of a log and print the resulting state.
    ///
    /// Opening the log recovers it first: a torn or damaged tail is cut off, moved to
    /// DIR/quarantine/ and reported. The last line is
    /// `position=<P> state_hash=<32 hex> nodes=<n> blobs=<b> replicas=<r> daemons=<d> rejected=<k>`
    /// where replicas counts copies not deleted, daemons counts instances running, and
    /// rejected counts events fold refused (each with a reason).
    Replay {
        /// The log directory.
        dir: PathBuf,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// Also print the last rejected events with their reasons (up to this many).
        #[arg(long, default_value_t = 0)]
        show_rejections: usize,
        /// Also run the reconcile pass after every record, as a node does, so the hash
        /// covers in-flight actions and gates too (slower on churny logs).
        #[arg(long)]
        reconcile: bool,
        /// Fold and reconcile with this node's settings (its config file or data
        /// directory): a node's decisions depend on its [fold] and [reconcile] values,
        /// so replaying its log to its state hash needs them. Without it: the defaults.
        #[arg(long, value_name = "NODE.toml | DIR")]
        config: Option<PathBuf>,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Check every record of a log without changing it; exit 1 if any is damaged.
    ///
    /// Checks segment headers, frame headers, checksums, dense positions, monotone
    /// times and that every payload validates. A damaged log is named by file, record
    /// position and byte offset, and every damaged record after it is listed.
    Verify {
        /// The log directory.
        dir: PathBuf,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Repair a log damaged in the middle (the node refuses to start on one).
    ///
    /// Keeps every intact record at its position, writes an empty record (which fold
    /// counts as rejected) at each position whose record is lost, never renumbers, and
    /// moves the old segment files whole into DIR/quarantine/salvaged-<ms>/. Stop the
    /// node first (salvage takes the log's lock). Prints what was lost.
    Salvage {
        /// The log directory (a node's DATA_DIR/log).
        dir: PathBuf,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
        #[command(flatten)]
        limits: LimitArgs,
    },
}

/// Position ranges as `3, 7..=9`, at most 20 of them.
fn position_ranges(ranges: &[(u64, u64)]) -> String {
    let mut shown: Vec<String> = ranges
        .iter()
        .take(20)
        .map(|(first, last)| if first == last { first.to_string() } else { format!("{first}..={last}") })
        .collect();
    if ranges.len() > 20 {
        shown.push(format!("and {} more ranges", ranges.len() - 20));
    }
    shown.join(", ")
}

/// Prints progress on stderr: a rewritten line on a terminal, a line every few seconds elsewhere.
struct ProgressPrinter {
    label: &'static str,
    started: Instant,
    last: Option<Instant>,
    terminal: bool,
}

impl ProgressPrinter {
    fn new(label: &'static str) -> ProgressPrinter {
        ProgressPrinter { label, started: Instant::now(), last: None, terminal: std::io::stderr().is_terminal() }
    }

    fn update(&mut self, progress: Progress) {
        let every = if self.terminal { Duration::from_millis(200) } else { Duration::from_secs(5) };
        let now = Instant::now();
        let due = self.last.map_or(now - self.started >= Duration::from_secs(1), |last| now - last >= every);
        if !due {
            return;
        }
        self.last = Some(now);
        let rate = progress.done as f64 / (now - self.started).as_secs_f64().max(1e-9);
        let percent = if progress.total > 0 { progress.done as f64 * 100.0 / progress.total as f64 } else { 0.0 };
        let line = format!(
            "{}: {}/{} {} ({percent:.0}%), {rate:.0} {}/s",
            self.label, progress.done, progress.total, progress.unit, progress.unit
        );
        let mut stderr = std::io::stderr().lock();
        if self.terminal {
            let _ = write!(stderr, "\r{line}\x1b[K");
        } else {
            let _ = writeln!(stderr, "{line}");
        }
    }

    fn finish(&self) {
        if self.terminal && self.last.is_some() {
            eprintln!();
        }
    }
}

/// Text from the log made safe for a terminal: control characters are escaped.
fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|character| {
            let escaped: Vec<char> =
                if character.is_control() { character.escape_default().collect() } else { vec![character] };
            escaped
        })
        .collect()
}

fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for character in text.chars() {
        match character {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            control if (control as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", control as u32)),
            other => out.push(other),
        }
    }
    out.push('"');
    out
}

/// Logs to stderr through `tracing`, at RUST_LOG's level (a level or `target=level`
/// list) or else the config's.
fn init_tracing(config_level: &str) -> anyhow::Result<()> {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    let filter: Targets = match std::env::var("RUST_LOG") {
        Ok(text) if !text.trim().is_empty() => {
            text.parse().with_context(|| format!("RUST_LOG=`{text}` is not a level or a target=level list"))?
        }
        _ => config_level.parse().with_context(|| format!("log_level `{config_level}`"))?,
    };
    let format =
        tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    tracing_subscriber::registry().with(format).with(filter).init();
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Node { config } => {
            let node_config = meshos::node::config::NodeConfig::load(&config)?;
            init_tracing(&node_config.log_level)?;
            // The CLI finds this node from its data directory (`--dir`, MESHOS_DIR).
            std::fs::create_dir_all(&node_config.data_dir)
                .with_context(|| format!("cannot create {}", node_config.data_dir.display()))?;
            let pointer = node_config.data_dir.join(meshos::node::config::CONFIG_POINTER_FILE);
            let absolute = std::fs::canonicalize(&config).unwrap_or(config.clone());
            std::fs::write(&pointer, format!("{}\n", absolute.display()))
                .with_context(|| format!("cannot write {}", pointer.display()))?;
            let stop = meshos::sys::signals::StopFlag::on_terminate().context("cannot install signal handlers")?;
            let report = meshos::node::run::run(&node_config, &stop)?;
            println!(
                "node: position={} state_hash={} events={} rejected={} records_committed={} dispatched={}",
                report.position,
                hash_hex(report.state_hash),
                report.events_applied,
                report.rejected,
                report.sequencer.records,
                report.dispatched_actions
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Admin(line) => run_admin(line),
        Command::Snapshot(SnapshotCommandLine::Show { file, config, output }) => {
            run_snapshot_show(file, config, output, false)
        }
        Command::Status { config, output } => run_snapshot_show(None, Some(config), output, true),
        Command::Explain { target, config, history, output } => {
            let node_config = meshos::node::config::NodeConfig::load_file_or_dir(&config)?;
            let explanation =
                meshos::explain::explain(&node_config.log_dir(), &node_config.engine_config()?, &target, history)?;
            if output == Output::Json {
                let list = |lines: &[String]| lines.iter().map(|line| json_string(line)).collect::<Vec<_>>().join(",");
                println!(
                    "{{\"target\":{},\"position\":{},\"now\":[{}],\"history\":[{}],\"waiting\":[{}]}}",
                    json_string(&target),
                    explanation.position,
                    list(&explanation.now),
                    list(&explanation.history),
                    list(&explanation.waiting)
                );
            } else {
                println!("as of log position {}:", explanation.position);
                explanation.now.iter().for_each(|line| println!("{}", printable(line)));
                println!("last actions about it ({}):", explanation.history.len());
                explanation.history.iter().for_each(|line| println!("  {}", printable(line)));
                if explanation.waiting.is_empty() {
                    println!("nothing holds its next action back");
                } else {
                    println!("waiting:");
                    explanation.waiting.iter().for_each(|line| println!("  {}", printable(line)));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch { config, interval_ms } => loop {
            // Clear the screen and go home, then the same tables as `meshos status`.
            print!("\x1b[2J\x1b[H");
            if let Err(error) = run_snapshot_show(None, Some(config.clone()), Output::Text, true) {
                println!("{error:#}");
            }
            println!("\n(every {} ms; Ctrl-C to leave)", interval_ms);
            std::thread::sleep(Duration::from_millis(interval_ms.max(100)));
        },
        Command::Daemon(line) => run_daemon(line),
        Command::DemoWorker => {
            use meshos::sdk::{self, Control};
            let mut daemon = sdk::register_daemon()?;
            println!("worker registered as {} on {}", daemon.name(), daemon.node());
            daemon.publish_capabilities(&["demo"])?;
            loop {
                daemon.report_health(true)?;
                daemon.report_saturation(100)?;
                match daemon.next_control_timeout(Duration::from_secs(1))? {
                    Some(Control::Shutdown) | Some(Control::Restart) => break,
                    Some(Control::ReloadConfig) | None => {}
                }
            }
            println!("worker shutting down");
            daemon.graceful_shutdown()?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { nodes, dir, blobs, blob_bytes } => {
            use meshos::node::demo;
            let dir = dir.unwrap_or_else(demo::default_dir);
            anyhow::ensure!(
                demo::usable_dir(&dir),
                "{} is not empty and not a demo directory: pick another --dir",
                dir.display()
            );
            let options = demo::DemoOptions { nodes, dir, blobs, blob_bytes, replicas: 3 };
            let configs = demo::configs(&options)?;
            init_tracing("warn")?;
            let stop = meshos::sys::signals::StopFlag::on_terminate().context("cannot install signal handlers")?;
            let seeder = {
                let (options, first) = (options.clone(), configs[0].clone());
                std::thread::spawn(move || match demo::seed(&options, &first) {
                    Ok(done) => println!("{done}\n\n{}", demo::guide(&options)),
                    Err(error) => eprintln!("meshos demo: cannot seed the workload: {error}"),
                })
            };
            let report = meshos::node::run::run_group(&configs, &stop)?;
            let _ = seeder.join();
            println!("demo stopped: position={} state_hash={}", report.position, hash_hex(report.state_hash));
            Ok(ExitCode::SUCCESS)
        }
        Command::Put { file, replicas, zone_spread, common } => run_put(&file, replicas, zone_spread, &common),
        Command::Get { blob, out, config } => run_get(&blob, &out, &config),
        Command::Cluster(ClusterCommand::Init { out, nodes, operator_keys }) => {
            run_cluster_init(&out, &nodes, &operator_keys)
        }
        Command::Config(ConfigCommand::Default) => {
            print!("{}", meshos::node::config::EXAMPLE_TOML);
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::Check { file }) => {
            let config = meshos::node::config::NodeConfig::load(&file)?;
            println!("{}: ok (node `{}`, data in {})", file.display(), config.name, config.data_dir.display());
            println!(
                "ingest memory at most {:.2} GiB: (connections_max + local_connections_max) x {} KiB + \
                 queue_bytes_total_max + partial_frame_bytes_max",
                config.ingest_memory_bytes_max() as f64 / (1u64 << 30) as f64,
                meshos::sys::reactor::CONNECTION_FIXED_BYTES_MAX.div_ceil(1024)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Sim { seed, nodes, blobs, replicas, steps } => {
            let options = SimOptions { seed, nodes, blobs, replicas, steps };
            if let Err(reason) = options.check() {
                eprintln!("error: {reason}");
                return Ok(ExitCode::from(2));
            }
            let mut printer = ProgressPrinter::new("sim");
            let report = sim::cluster::run(&options, &Config::for_tests(), &mut |step, steps| {
                printer.update(Progress { done: step as u64, total: steps as u64, unit: "steps" })
            });
            printer.finish();
            for violation in &report.violations {
                println!(
                    "violation: seed={} step={} position={}: {}",
                    report.seed, violation.step, violation.position, violation.what
                );
            }
            let stats = &report.stats;
            eprintln!(
                "sim: crashes={} partitions={} slow_nodes={} corruptions={} intent_changes={} lost_actions={} \
                 abandoned={} failed_moves={} late_moves={} redundant_moves={} timed_out={} drops={} verifies={} \
                 avoid_marks={} backoffs={} brake_steps={} fenced_rejoins={} maintenance_entries={} \
                 drains_completed={} drains_failed={} maintenance_exits={} away_max={} converged_at_step={}",
                stats.crashes,
                stats.partitions,
                stats.slow_nodes,
                stats.corruptions,
                stats.intent_changes,
                stats.lost_actions,
                stats.abandoned,
                stats.failed_moves,
                stats.late_moves,
                stats.redundant_moves,
                stats.timed_out,
                stats.drops,
                stats.verifies,
                stats.avoid_marks,
                stats.backoffs,
                stats.brake_steps,
                stats.fenced_rejoins,
                stats.maintenance_entries,
                stats.drains_completed,
                stats.drains_failed,
                stats.maintenance_exits,
                stats.away_max,
                stats.converged_at_step
            );
            if !report.converged {
                println!("not converged: seed={}: {}", report.seed, stats.unconverged);
            }
            println!("{report}");
            let ok = report.violations.is_empty() && report.converged;
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Log(LogCommand::Gen { out, seed, nodes, blobs, replicas, events, record_events, limits }) => {
            // A generated log is signed with the test keys; its genesis goes beside it.
            let genesis = meshos::trust::Genesis::for_tests::<&str>(&[]);
            let config =
                Config { fsync: FsyncPolicy::Manual, record_events_max: record_events, genesis, ..limits.config() };
            let options = GenOptions { seed, nodes, blobs, replicas, events, record_events };
            let mut printer = ProgressPrinter::new("gen");
            let report = logtool::generate(&out, &options, &config, &mut |progress| printer.update(progress))
                .with_context(|| format!("cannot generate a log in {}", out.display()))?;
            printer.finish();
            config.genesis.write_new(&out.join("genesis.toml"))?;
            println!(
                "wrote {} events in {} records to {} (positions 1..={}); replay it with: meshos log replay {}",
                report.events,
                report.records,
                out.display(),
                report.last_position,
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Log(LogCommand::Replay { dir, output, show_rejections, reconcile, config, limits }) => {
            let base = match &config {
                Some(path) => meshos::node::config::NodeConfig::load_file_or_dir(path)?.engine_config()?,
                None => limits.config_for(&dir)?,
            };
            let config = Config { fsync: FsyncPolicy::Manual, ..base };
            let mut printer = ProgressPrinter::new("replay");
            let report = logtool::replay(&dir, &config, reconcile, &mut |progress| printer.update(progress))
                .with_context(|| format!("cannot replay {}", dir.display()))?;
            printer.finish();
            let recovery = &report.recovery;
            let summary = &report.summary;
            let reasons: Vec<(&str, u64)> = REJECT_REASON_NAMES
                .iter()
                .zip(report.state.rejections.by_reason)
                .filter(|(_, count)| *count > 0)
                .map(|(name, count)| (*name, count))
                .collect();
            if output == Output::Json {
                let damage =
                    recovery.damage.as_ref().map_or("null".to_string(), |damage| json_string(&damage.to_string()));
                println!(
                    "{{\"position\":{},\"state_hash\":\"{}\",\"nodes\":{},\"blobs\":{},\"replicas\":{},\"daemons\":{},\"rejected\":{},\
                     \"rejected_by_reason\":{{{}}},\"events\":{},\"recovered\":{{\"dropped_records\":{},\"dropped_bytes\":{},\"damage\":{}}}}}",
                    summary.position,
                    hash_hex(summary.state_hash),
                    summary.nodes,
                    summary.blobs,
                    summary.replicas,
                    summary.daemons,
                    summary.rejected,
                    reasons.iter().map(|(name, count)| format!("\"{name}\":{count}")).collect::<Vec<_>>().join(","),
                    report.events,
                    recovery.dropped_records,
                    recovery.dropped_bytes,
                    damage
                );
                return Ok(ExitCode::SUCCESS);
            }
            if recovery.dropped_bytes > 0 {
                let damage = recovery.damage.as_ref().map_or("torn tail".to_string(), |damage| damage.to_string());
                let quarantine = recovery
                    .quarantine_path
                    .as_ref()
                    .map_or(String::new(), |path| format!("; kept in {}", path.display()));
                println!(
                    "recovered: dropped the tail after position {}: {} records, {} bytes ({damage}){quarantine}",
                    recovery.last_position, recovery.dropped_records, recovery.dropped_bytes
                );
            }
            if reconcile {
                println!(
                    "reconcile: {} actions emitted, {} in flight at the end",
                    report.actions,
                    report.state.inflight.len()
                );
            }
            for rejection in report.state.rejections.kept.iter().rev().take(show_rejections).rev() {
                println!("rejected: {}", printable(&rejection.to_string()));
            }
            if !reasons.is_empty() {
                let counts: Vec<String> = reasons.iter().map(|(name, count)| format!("{name}={count}")).collect();
                println!("rejected by reason: {} (see them with --show-rejections K)", counts.join(" "));
            }
            println!("{summary}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Log(LogCommand::Verify { dir, output, limits }) => {
            // Verify checks frames and payload shapes, not signatures: no genesis needed.
            let config = limits.config();
            let report = logtool::verify(&dir, &config).with_context(|| format!("cannot verify {}", dir.display()))?;
            if output == Output::Json {
                let damage =
                    report.damage.as_ref().map_or("null".to_string(), |damage| json_string(&damage.to_string()));
                println!(
                    "{{\"ok\":{},\"segments\":{},\"records\":{},\"events\":{},\"bytes\":{},\"first_position\":{},\
                     \"last_position\":{},\"damage\":{},\"bytes_after_damage\":{},\"invalid_payloads\":{},\
                     \"intact_after_damage\":{},\"damaged_positions\":[{}]}}",
                    report.damage.is_none() && report.invalid_payloads == 0,
                    report.segments,
                    report.records,
                    report.events,
                    report.bytes,
                    report.first_position,
                    report.last_position,
                    damage,
                    report.bytes_after_damage,
                    report.invalid_payloads,
                    report.intact_after_damage,
                    report
                        .damaged_positions
                        .iter()
                        .map(|(first, last)| format!("[{first},{last}]"))
                        .collect::<Vec<_>>()
                        .join(",")
                );
            } else {
                println!(
                    "checked {} segments: {} intact records (positions {}..={}), {} events, {} bytes",
                    report.segments,
                    report.records,
                    report.first_position,
                    report.last_position,
                    report.events,
                    report.bytes
                );
                if let Some(first) = &report.first_invalid_payload {
                    println!(
                        "INVALID PAYLOAD: {} intact records do not hold a valid event batch; the first: {first}\n\
                         open keeps them and fold rejects each one as bad_payload",
                        report.invalid_payloads
                    );
                }
                match &report.damage {
                    None if report.invalid_payloads == 0 => println!("ok: no damage"),
                    None => println!("no damage to the frames"),
                    Some(damage) if report.intact_after_damage == 0 => println!(
                        "DAMAGED: {damage}\na torn tail: {} bytes from there on would be dropped (kept in DIR/quarantine/) when the log is next opened",
                        report.bytes_after_damage
                    ),
                    Some(damage) => {
                        println!("DAMAGED: {damage}");
                        println!(
                            "{} intact records follow it: the log is damaged in the middle, and a node refuses to start on it",
                            report.intact_after_damage
                        );
                        println!("damaged or missing records: {}", position_ranges(&report.damaged_positions));
                        println!(
                            "repair: stop the node, then `meshos log salvage {}` (every intact record kept at its position)",
                            dir.display()
                        );
                    }
                }
            }
            let intact = report.damage.is_none() && report.invalid_payloads == 0;
            Ok(if intact { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Log(LogCommand::Salvage { dir, output, limits }) => {
            let config = limits.config();
            let report = meshos::redex::embedded::salvage(&dir, &config)
                .with_context(|| format!("cannot salvage {}", dir.display()))?;
            if output == Output::Json {
                let ranges: Vec<String> =
                    report.hole_ranges.iter().map(|(first, last)| format!("[{first},{last}]")).collect();
                println!(
                    "{{\"first_position\":{},\"last_position\":{},\"kept\":{},\"holes\":{},\"hole_ranges\":[{}],\
                     \"quarantined_to\":{}}}",
                    report.first_position,
                    report.last_position,
                    report.kept,
                    report.holes,
                    ranges.join(","),
                    report
                        .quarantined_to
                        .as_ref()
                        .map_or("null".to_string(), |path| json_string(&path.display().to_string()))
                );
            } else if report.quarantined_to.is_none() {
                println!("{}: no damage, nothing changed ({} records)", dir.display(), report.kept);
            } else {
                println!(
                    "{}: kept {} intact records at their positions {}..={}; {} records lost, now empty records fold rejects: {}",
                    dir.display(),
                    report.kept,
                    report.first_position,
                    report.last_position,
                    report.holes,
                    position_ranges(&report.hole_ranges)
                );
                for (path, from, to) in &report.damaged_ranges {
                    println!("  damaged bytes {from}..{to} of {}", path.display());
                }
                println!(
                    "the old segment files are in {}",
                    report.quarantined_to.as_ref().map_or(String::new(), |path| path.display().to_string())
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Turns the command line into a command to sign and its common arguments.
fn admin_command(line: AdminCommandLine) -> anyhow::Result<(AdminCommand, AdminArgs)> {
    let blob = |text: Option<String>| text.map(|text| admin::parse_blob(&text)).transpose();
    let all_or = |node: Option<String>, all: bool| if all { None } else { node };
    Ok(match line {
        AdminCommandLine::Keygen { .. } | AdminCommandLine::PublicKey { .. } => {
            anyhow::bail!("keygen and public-key sign nothing")
        }
        AdminCommandLine::EnterMaintenance { node, common } => (AdminCommand::EnterMaintenance { node }, common),
        AdminCommandLine::ExitMaintenance { node, common } => (AdminCommand::ExitMaintenance { node }, common),
        AdminCommandLine::Drain { node, common } => (AdminCommand::Drain { node }, common),
        AdminCommandLine::Cordon { node, common } => (AdminCommand::Cordon { node }, common),
        AdminCommandLine::Uncordon { node, common } => (AdminCommand::Uncordon { node }, common),
        AdminCommandLine::RestartDaemons { node, all, common } => {
            (AdminCommand::RestartAllDaemons { node: all_or(node, all) }, common)
        }
        AdminCommandLine::ClearAvoid { node, all, common } => {
            (AdminCommand::ClearAvoid { node: all_or(node, all) }, common)
        }
        AdminCommandLine::DropReplicas { node, blob: text, common } => {
            (AdminCommand::DropReplicas { node, blob: blob(text)? }, common)
        }
        AdminCommandLine::InvalidatePlacement { blob: text, common } => {
            (AdminCommand::InvalidatePlacement { blob: blob(text)? }, common)
        }
        AdminCommandLine::SetKeyring { version, public_keys, common } => {
            let keys = public_keys.iter().map(|text| admin::parse_public_key(text)).collect::<Result<Vec<_>, _>>()?;
            (AdminCommand::SetKeyring { version, keys }, common)
        }
        AdminCommandLine::AdmitNode { name, node_key, common } => {
            meshos::trust::check_node_name(&name).map_err(|error| anyhow::anyhow!("`{name}`: {error}"))?;
            (AdminCommand::AdmitNode { name, key: admin::parse_public_key(&node_key)? }, common)
        }
        AdminCommandLine::RemoveNode { name, common } => (AdminCommand::RemoveNode { name }, common),
    })
}

fn run_admin(line: AdminCommandLine) -> anyhow::Result<ExitCode> {
    match &line {
        AdminCommandLine::Keygen { out } => {
            let key = admin::OperatorKey::generate(out)?;
            let public = key.public_key_hex();
            println!("wrote {} (mode 0600); public key: {public}", out.display());
            println!(
                "next: put this public key in the cluster keyring: name it at `meshos cluster init --operator-key`, \
                 or have an operator whose key is in the keyring run `meshos admin set-keyring` with the next \
                 version, listing every key to keep and this one ({}).",
                out.display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        AdminCommandLine::PublicKey { key } => {
            println!("{}", admin::OperatorKey::load(key)?.public_key_hex());
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let (command, common) = admin_command(line)?;
    let node_config = meshos::node::config::NodeConfig::load_file_or_dir(&common.config)?;
    let (key, key_path) = meshos::node::identity::operator_key(&node_config, common.key.as_deref())?;
    let operator = match &common.operator {
        Some(operator) => operator.clone(),
        None => admin::default_operator_name(),
    };
    let config = node_config
        .engine_config()
        .with_context(|| format!("cannot load the cluster's genesis of node `{}`", node_config.name))?;
    let command_name = admin::COMMAND_NAMES[admin::command_code(&command) as usize];
    if common.dry_run {
        let preview = admin::preview::preview(&node_config.log_dir(), &config, &key, &operator, &command)
            .with_context(|| format!("cannot preview on the log of node `{}`", node_config.name))?;
        if common.output == Output::Json {
            println!("{}", preview_json(&preview));
        } else {
            print_preview(&preview, &operator, &key, &key_path, &node_config.name, common.show);
        }
        return Ok(if preview.applied { ExitCode::SUCCESS } else { ExitCode::from(1) });
    }
    let payload = admin::sign_now(&key, &operator, config.genesis.cluster_id(), vec![admin::command_kind(command)])?;
    let timeout = Duration::from_millis(common.timeout_ms);
    let socket = node_config.local_socket_path();
    let ack = admin::submit::send_payload(&socket, &payload, timeout)
        .with_context(|| format!("cannot send to node `{}` on {}", node_config.name, socket.display()))?;
    let outcome = admin::submit::outcome(&node_config.log_dir(), &config, ack.position)
        .with_context(|| format!("appended at position {}, but cannot read the log back", ack.position))?;
    let (word, reason, message) = match &outcome {
        admin::submit::Outcome::Applied => ("applied", None, None),
        admin::submit::Outcome::Rejected(reason, message) => ("rejected", Some(*reason), Some(message.clone())),
        admin::submit::Outcome::NotInLog { .. } => ("unknown", None, None),
    };
    if common.output == Output::Json {
        let text = |value: Option<&str>| value.map_or("null".to_string(), json_string);
        println!(
            "{{\"command\":\"{command_name}\",\"position\":{},\"outcome\":\"{word}\",\"reason\":{},\"message\":{}}}",
            ack.position,
            text(reason),
            text(message.as_deref())
        );
    } else {
        match &outcome {
            admin::submit::Outcome::Applied => {
                println!("{command_name}: appended at log position {} and applied", ack.position)
            }
            admin::submit::Outcome::Rejected(reason, message) => println!(
                "{command_name}: appended at log position {} but REJECTED ({reason}): {}",
                ack.position,
                printable(message)
            ),
            admin::submit::Outcome::NotInLog { log_position } => println!(
                "{command_name}: appended at log position {}; the log read here ends at {log_position}: check \
                 `meshos log replay --show-rejections 10` for a rejection",
                ack.position
            ),
        }
    }
    Ok(if word == "applied" { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn run_cluster_init(out: &std::path::Path, nodes: &[String], operator_keys: &[PathBuf]) -> anyhow::Result<ExitCode> {
    use meshos::trust::{Genesis, KeyPair};
    for name in nodes {
        meshos::trust::check_node_name(name).map_err(|error| anyhow::anyhow!("--nodes `{name}`: {error}"))?;
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let genesis_path = out.join("genesis.toml");
    anyhow::ensure!(
        !genesis_path.exists(),
        "{} exists: a cluster was initialized there already",
        genesis_path.display()
    );
    let mut operators = Vec::new();
    for path in operator_keys {
        operators.push(KeyPair::load(path)?.public_key());
    }
    if operators.is_empty() {
        let path = out.join("admin.key");
        operators.push(KeyPair::generate(&path)?.public_key());
        println!("wrote {} (mode 0600): the operator key; keep it secret", path.display());
    }
    let mut admitted = Vec::new();
    for name in nodes {
        let path = out.join(format!("{name}.key"));
        let key = KeyPair::generate(&path)?;
        println!("wrote {} (mode 0600): {name}'s key; copy it to that node as DATA_DIR/node.key", path.display());
        admitted.push((name.clone(), key.public_key()));
    }
    let genesis = Genesis::generate(operators, admitted)?;
    genesis.write_new(&genesis_path)?;
    println!(
        "wrote {}: cluster {}; copy it to every node's data directory (or name it in [cluster] genesis_file)",
        genesis_path.display(),
        genesis.cluster_id_hex()
    );
    Ok(ExitCode::SUCCESS)
}

fn run_daemon_ls(config: &std::path::Path, output: Output) -> anyhow::Result<ExitCode> {
    let path = meshos::node::config::NodeConfig::load_file_or_dir(config)?.snapshot_path();
    let mapped = meshos::snapshot::MappedSnapshot::open(&path)
        .with_context(|| "no snapshot to read: is the node running, with `[snapshot] interval_ms` above 0?")?;
    let snapshot = mapped.get();
    fn text(value: Option<&rkyv::string::ArchivedString>) -> &str {
        value.map_or("?", |name| name.as_str())
    }
    let mut rows = Vec::new();
    for daemon in snapshot.daemons.iter() {
        rows.push((
            text(snapshot.specs.get(daemon.spec.to_native() as usize).map(|spec| &spec.name)),
            text(snapshot.nodes.name.get(daemon.node.to_native() as usize)),
            text(snapshot.names.daemon_state.get(daemon.state as usize)),
            daemon,
        ));
    }
    if output == Output::Json {
        let items: Vec<String> = rows
            .iter()
            .map(|(name, node, state, daemon)| {
                format!(
                    "{{\"daemon\":{},\"node\":{},\"state\":{},\"pid\":{},\"healthy\":{},\"saturation_permille\":{},\
                     \"starts\":{},\"crashes\":{},\"last_exit\":{},\"backoff_ms\":{},\"start_after_ms\":{},\"gated\":{}}}",
                    json_string(name),
                    json_string(node),
                    json_string(state),
                    daemon.pid,
                    daemon.healthy,
                    daemon.saturation_permille,
                    daemon.starts,
                    daemon.crashes,
                    daemon.last_exit,
                    daemon.backoff_ms,
                    daemon.start_after_ms,
                    daemon.gated
                )
            })
            .collect();
        println!("{{\"position\":{},\"daemons\":[{}]}}", snapshot.position, items.join(","));
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<16} {:<12} {:<11} {:>8} {:>7} {:>5} {:>6} {:>7} {:>9}  gate",
        "DAEMON", "NODE", "STATE", "PID", "HEALTHY", "LOAD", "STARTS", "CRASHES", "BACKOFF"
    );
    for (name, node, state, daemon) in &rows {
        println!(
            "{:<16} {:<12} {:<11} {:>8} {:>7} {:>5} {:>6} {:>7} {:>9}  {}",
            printable(name),
            printable(node),
            state,
            daemon.pid,
            daemon.healthy,
            daemon.saturation_permille,
            daemon.starts,
            daemon.crashes,
            duration_text(daemon.backoff_ms.to_native() as u64),
            if daemon.gated { "GATED (meshos admin restart-daemons NODE)" } else { "" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn run_daemon(line: DaemonCommandLine) -> anyhow::Result<ExitCode> {
    use meshos::event::{DaemonPlacement, DaemonSpec, EventKind};
    let (kind, name, common) = match line {
        DaemonCommandLine::Ls { config, output } => return run_daemon_ls(&config, output),
        DaemonCommandLine::Apply { spec, common } => {
            let (spec, runs_on) = meshos::node::spec_file::load(&spec).map_err(anyhow::Error::msg)?;
            let name = spec.name.clone();
            (EventKind::DaemonIntent { spec: Box::new(spec), runs_on }, name, common)
        }
        DaemonCommandLine::Remove { name, common } => {
            // Removal needs only the name: the rest of the spec is kept from the last intent.
            let spec = DaemonSpec::new(&name, "");
            (EventKind::DaemonIntent { spec: Box::new(spec), runs_on: DaemonPlacement::Nowhere }, name, common)
        }
    };
    let node_config = meshos::node::config::NodeConfig::load_file_or_dir(&common.config)?;
    let config = node_config
        .engine_config()
        .with_context(|| format!("cannot load the cluster's genesis of node `{}`", node_config.name))?;
    let (key, _) = meshos::node::identity::operator_key(&node_config, common.key.as_deref())?;
    let payload = admin::sign_now(&key, &admin::default_operator_name(), config.genesis.cluster_id(), vec![kind])?;
    let socket = node_config.local_socket_path();
    let ack = admin::submit::send_payload(&socket, &payload, Duration::from_millis(common.timeout_ms))
        .with_context(|| format!("cannot send to node `{}` on {}", node_config.name, socket.display()))?;
    let outcome = admin::submit::outcome(&node_config.log_dir(), &config, ack.position)
        .with_context(|| format!("appended at position {}, but cannot read the log back", ack.position))?;
    let (word, message) = match &outcome {
        admin::submit::Outcome::Applied => ("applied", String::new()),
        admin::submit::Outcome::Rejected(reason, message) => ("rejected", format!("{reason}: {}", printable(message))),
        admin::submit::Outcome::NotInLog { .. } => ("unknown", String::new()),
    };
    if common.output == Output::Json {
        println!(
            "{{\"daemon\":{},\"position\":{},\"outcome\":\"{word}\",\"message\":{}}}",
            json_string(&name),
            ack.position,
            json_string(&message)
        );
    } else if word == "rejected" {
        println!("daemon {name}: appended at log position {} but REJECTED ({message})", ack.position);
    } else {
        println!("daemon {name}: appended at log position {} ({word})", ack.position);
    }
    Ok(if word == "applied" { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn run_put(file: &std::path::Path, replicas: u8, zone_spread: bool, common: &DaemonArgs) -> anyhow::Result<ExitCode> {
    use meshos::event::{EventKind, PlacementIntent, ReplicaState};
    anyhow::ensure!((1..=8).contains(&replicas), "--replicas must be 1..=8, not {replicas}");
    let node_config = meshos::node::config::NodeConfig::load_file_or_dir(&common.config)?;
    let store = meshos::exec::blobstore::BlobStore::attach(&node_config.blobs_dir())?;
    let mut source = std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
    let (blob, size_bytes) = store.put(&mut source, None, node_config.blobs.blob_bytes_max, &mut |_| {})?;
    let config = node_config
        .engine_config()
        .with_context(|| format!("cannot load the cluster's genesis of node `{}`", node_config.name))?;
    let (key, _) = meshos::node::identity::operator_key(&node_config, common.key.as_deref())?;
    // The copy is the node's fact (its own section, signed by the node); the placement
    // intent is the operator's (signed here).
    let facts = vec![
        EventKind::BlobAnnounce { blob, size_bytes },
        EventKind::ReplicaUpdate { blob, state: ReplicaState::Healthy },
    ];
    let intent = EventKind::PlacementIntent(PlacementIntent { blob, replicas, zone_spread, pinned: Vec::new() });
    let intent = admin::sign_now(&key, &admin::default_operator_name(), config.genesis.cluster_id(), vec![intent])?;
    let socket = node_config.local_socket_path();
    let timeout = Duration::from_millis(common.timeout_ms);
    admin::submit::send_events(&socket, &node_config.name, facts, timeout)
        .with_context(|| format!("cannot send to node `{}` on {}", node_config.name, socket.display()))?;
    let ack = admin::submit::send_payload(&socket, &intent, timeout)
        .with_context(|| format!("cannot send to node `{}` on {}", node_config.name, socket.display()))?;
    let id = meshos::exec::blobstore::hex(&blob);
    if common.output == Output::Json {
        println!(
            "{{\"blob\":\"{id}\",\"size_bytes\":{size_bytes},\"replicas\":{replicas},\"position\":{}}}",
            ack.position
        );
    } else {
        println!("{id}");
        eprintln!(
            "stored {size_bytes} bytes on {}; {replicas} replicas wanted (log position {})",
            node_config.name, ack.position
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn run_get(blob: &str, out: &std::path::Path, config: &std::path::Path) -> anyhow::Result<ExitCode> {
    use meshos::exec::blobstore::{parse_hex, BlobStore};
    let hash = parse_hex(blob).with_context(|| format!("`{blob}` is not a blob id (64 hex characters)"))?;
    let node_config = meshos::node::config::NodeConfig::load_file_or_dir(config)?;
    let store = BlobStore::attach(&node_config.blobs_dir())?;
    let bytes_max = node_config.blobs.blob_bytes_max;
    let timeout = Duration::from_millis(node_config.blobs.fetch_timeout_ms as u64);
    // A fresh name beside the output, created exclusively (never through a planted
    // symlink, never shared with another `get`), renamed into place once checked.
    let mut nonce = [0u8; 8];
    meshos::sys::process::random_bytes(&mut nonce)?;
    let file_name = out.file_name().map_or_else(|| "blob".into(), |name| name.to_string_lossy().into_owned());
    let temporary = out.with_file_name(format!(".{file_name}.{}.part", meshos::event::hex(&nonce)));
    let write = |source: &mut dyn std::io::Read| -> anyhow::Result<u64> {
        let mut hasher = blake3::Hasher::new();
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temporary)
            .with_context(|| format!("cannot create {}", temporary.display()))?;
        let mut size = 0u64;
        let mut chunk = vec![0u8; 256 * 1024];
        loop {
            let read = source.read(&mut chunk)?;
            if read == 0 {
                break;
            }
            size += read as u64;
            anyhow::ensure!(size <= bytes_max, "blob larger than blobs.blob_bytes_max ({bytes_max})");
            hasher.update(&chunk[..read]);
            std::io::Write::write_all(&mut file, &chunk[..read])?;
        }
        anyhow::ensure!(hasher.finalize().as_bytes() == &hash, "the bytes do not match the blob id");
        file.sync_all()?;
        std::fs::rename(&temporary, out)?;
        Ok(size)
    };
    if store.contains(&hash) {
        let size = write(&mut store.open_blob(&hash)?).inspect_err(|_| {
            let _ = std::fs::remove_file(&temporary);
        })?;
        eprintln!("{size} bytes from this node's store to {}", out.display());
        return Ok(ExitCode::SUCCESS);
    }
    // Not here: ask the log who holds it and fetch from them.
    let (engine, _) =
        admin::preview::replay_read_only(&node_config.log_dir(), &node_config.engine_config()?, u64::MAX)?;
    let state = &engine.state;
    let row = state.blobs.find(&hash).with_context(|| format!("blob {blob} is not in the log"))?;
    // The holders' peer ports want a node identity: this node's.
    let own = meshos::node::identity::load(&node_config)?;
    let keys = meshos::node::identity::StateKeys::from_state(state);
    let secure = node_config.node_identity(&own, keys).secure_config();
    let mut errors = Vec::new();
    for &replica in &state.blobs.replica_rows[row.index()] {
        let node = state.replicas.node[replica.index()].index();
        let endpoint = &state.nodes.endpoint[node];
        if state.replicas.state[replica.index()] != meshos::event::ReplicaState::Healthy || endpoint.is_empty() {
            continue;
        }
        let fetched = meshos::sys::peer_server::fetch(endpoint, &hash, &secure, Some(&state.nodes.name[node]), timeout)
            .map_err(anyhow::Error::from)
            .and_then(|(_, mut reader)| write(&mut reader));
        match fetched {
            Ok(size) => {
                eprintln!("{size} bytes from {} to {}", state.nodes.name[node], out.display());
                return Ok(ExitCode::SUCCESS);
            }
            Err(error) => {
                let _ = std::fs::remove_file(&temporary);
                errors.push(format!("{}: {error:#}", state.nodes.name[node]));
            }
        }
    }
    anyhow::bail!(
        "no holder delivered blob {blob}: {}",
        if errors.is_empty() { "none holds a healthy copy".to_string() } else { errors.join("; ") }
    )
}

#[derive(Subcommand)]
enum SnapshotCommandLine {
    /// Map a snapshot file read-only, validate it and print a summary: position and
    /// state hash, nodes by maintenance state (with drain progress), in-flight actions
    /// by kind, blobs held by each gate, drift, the global gates, failures.
    ///
    /// The node writes DATA_DIR/snapshot.rkyv (`[snapshot]` in its config) at most
    /// once per `interval_ms`, replacing it atomically; Deck maps the same file.
    #[command(after_help = "Example:\n  meshos snapshot show --config node.toml\n  \
                  meshos snapshot show --file /var/lib/meshos/snapshot.rkyv -o json")]
    Show {
        /// The snapshot file.
        #[arg(long, value_name = "PATH", required_unless_present = "config", conflicts_with = "config")]
        file: Option<PathBuf>,
        /// A node's config (or data directory): read the snapshot that node writes.
        #[arg(long, alias = "dir", value_name = "NODE.toml | DIR")]
        config: Option<PathBuf>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

/// One row of `meshos status`'s node table, read in place from the snapshot.
struct NodeLine {
    name: String,
    zone: String,
    status: String,
    live: bool,
    maintenance: String,
    load_permille: u16,
    copies: u32,
    daemons_running: u32,
    unsafe_copies: u32,
    avoid: bool,
    cordoned: bool,
}

fn node_lines(snapshot: &meshos::snapshot::ArchivedSnapshot) -> Vec<NodeLine> {
    let nodes = &snapshot.nodes;
    let name_of = |names: &rkyv::vec::ArchivedVec<rkyv::string::ArchivedString>, code: u8| {
        names.get(code as usize).map_or_else(|| format!("#{code}"), |name| name.to_string())
    };
    let mut running = vec![0u32; nodes.name.len()];
    for daemon in snapshot.daemons.iter() {
        let state = snapshot.names.daemon_state.get(daemon.state as usize).map(|name| name.as_str());
        if matches!(state, Some("started" | "registered")) {
            if let Some(count) = running.get_mut(daemon.node.to_native() as usize) {
                *count += 1;
            }
        }
    }
    (0..nodes.name.len())
        .map(|row| {
            let zone = nodes.zone[row].to_native();
            NodeLine {
                name: nodes.name[row].to_string(),
                zone: snapshot.symbols.get(zone as usize).map_or_else(String::new, |name| name.to_string()),
                status: name_of(&snapshot.names.node_status, nodes.status[row]),
                live: nodes.live[row],
                maintenance: name_of(&snapshot.names.maintenance, nodes.maintenance[row]),
                load_permille: nodes.load_permille[row].to_native(),
                copies: nodes.healthy_copies[row].to_native(),
                daemons_running: running[row],
                unsafe_copies: nodes.drain_unsafe_copies[row].to_native(),
                avoid: nodes.avoid[row],
                cordoned: nodes.cordoned[row],
            }
        })
        .collect()
}

fn run_snapshot_show(
    file: Option<PathBuf>,
    config: Option<PathBuf>,
    output: Output,
    node_table: bool,
) -> anyhow::Result<ExitCode> {
    let path = match (file, config) {
        (Some(file), _) => file,
        (None, Some(config)) => meshos::node::config::NodeConfig::load_file_or_dir(&config)?.snapshot_path(),
        (None, None) => unreachable!("clap requires --file or --config"),
    };
    let mapped = meshos::snapshot::MappedSnapshot::open(&path)
        .with_context(|| "no snapshot to read: is the node running, with `[snapshot] interval_ms` above 0?")?;
    let summary = mapped.get().summary();
    let lines = if node_table { node_lines(mapped.get()) } else { Vec::new() };
    let file_bytes = mapped.bytes().len();
    let counts = |counts: &[(String, u32)]| {
        counts.iter().map(|(name, count)| format!("{name}={count}")).collect::<Vec<_>>().join(" ")
    };
    let json_counts = |counts: &[(String, u32)]| {
        let fields: Vec<String> = counts.iter().map(|(name, count)| format!("{}:{count}", json_string(name))).collect();
        format!("{{{}}}", fields.join(","))
    };
    let eta = |eta_ms: Option<u64>| eta_ms.map_or("unknown".to_string(), duration_text);
    if output == Output::Json {
        let away: Vec<String> = summary
            .nodes_away
            .iter()
            .map(|node| {
                format!(
                    "{{\"node\":{},\"maintenance\":{},\"since_ms\":{},\"unsafe_copies\":{},\"moving_copies\":{},\
                     \"daemons_left\":{},\"unsafe_bytes\":{},\"eta_ms\":{},\"deadline_ms\":{}}}",
                    json_string(&node.node),
                    json_string(&node.maintenance),
                    node.since_ms,
                    node.unsafe_copies,
                    node.moving_copies,
                    node.daemons_left,
                    node.unsafe_bytes,
                    node.eta_ms.map_or("null".to_string(), |ms| ms.to_string()),
                    node.deadline_ms
                )
            })
            .collect();
        println!(
            "{{\"path\":{},\"file_bytes\":{file_bytes},\"format_version\":{},\"writer_node\":{},\
             \"written_unix_ms\":{},\"position\":{},\"log_time_ms\":{},\"events_applied\":{},\"state_hash\":\"{}\",\
             \"nodes\":{},\"nodes_live\":{},\"nodes_by_status\":{},\"nodes_by_maintenance\":{},\"nodes_away\":[{}],\
             \"blobs\":{},\"copies\":{},\"daemons\":{},\"daemons_running\":{},\"daemons_unhealthy\":{},\
             \"actions_inflight\":{},\"actions_by_kind\":{},\"blobs_held\":{},\"blobs_held_by_gate\":{},\
             \"daemons_backing_off\":{},\"daemons_gated\":{},\"drift\":{},\"copies_missing\":{},\"copies_surplus\":{},\
             \"backpressure\":{},\"brake\":{},\"window_moves\":{},\"throttle_moves_max\":{},\"moves_inflight\":{},\
             \"pull_inflight_max\":{},\"placement_epoch\":{},\"plans_invalid\":{},\"copies_off_plan\":{},\
             \"copies_pulling\":{},\"rejected_total\":{},\"actions_failed\":{},\"actions_timed_out\":{},\
             \"drain_blockers\":{},\"rtt_pairs\":{},\"fence\":{},\"nodes_diverged\":[{}],\
             \"commitment_position\":{},\"commitment_reporting\":{},\"commitment_agreeing\":{},\"ingest\":{}{}}}",
            json_string(&path.display().to_string()),
            summary.format_version,
            json_string(&summary.writer_node),
            summary.written_unix_ms,
            summary.position,
            summary.log_time_ms,
            summary.events_applied,
            hash_hex(summary.state_hash),
            summary.nodes,
            summary.nodes_live,
            json_counts(&summary.nodes_by_status),
            json_counts(&summary.nodes_by_maintenance),
            away.join(","),
            summary.blobs,
            summary.copies,
            summary.daemons,
            summary.daemons_running,
            summary.daemons_unhealthy,
            summary.actions_inflight,
            json_counts(&summary.actions_by_kind),
            summary.blobs_held,
            json_counts(&summary.blobs_held_by_gate),
            summary.daemons_backing_off,
            summary.daemons_gated,
            json_counts(&summary.drift),
            summary.copies_missing,
            summary.copies_surplus,
            summary.backpressure,
            summary.brake,
            summary.window_moves,
            summary.throttle_moves_max,
            summary.moves_inflight,
            summary.pull_inflight_max,
            summary.placement_epoch,
            summary.plans_invalid,
            summary.copies_off_plan,
            summary.copies_pulling,
            summary.rejected_total,
            summary.actions_failed,
            summary.actions_timed_out,
            summary.drain_blockers,
            summary.rtt_pairs,
            json_string(&summary.fence),
            summary.nodes_diverged.iter().map(|name| json_string(name)).collect::<Vec<_>>().join(","),
            summary.commitment_position,
            summary.commitment_reporting,
            summary.commitment_agreeing,
            {
                let named = |counts: &[(String, u64)]| {
                    let fields: Vec<String> =
                        counts.iter().map(|(name, count)| format!("{}:{count}", json_string(name))).collect();
                    format!("{{{}}}", fields.join(","))
                };
                format!(
                    "{{\"connections_open\":{},\"frames_in\":{},\"partial_frame_bytes\":{},\
                     \"partial_frame_bytes_peak\":{},\"partial_frame_bytes_max\":{},\"frames_refused\":{},\
                     \"frames_refused_by_reason\":{},\"connections_refused_by_reason\":{}}}",
                    summary.ingest_connections_open,
                    summary.ingest_frames_in,
                    summary.ingest_partial_frame_bytes,
                    summary.ingest_partial_frame_bytes_peak,
                    summary.ingest_partial_frame_bytes_max,
                    summary.ingest_frame_errors.iter().map(|(_, count)| count).sum::<u64>(),
                    named(&summary.ingest_frame_errors),
                    named(&summary.ingest_connection_refusals)
                )
            },
            if node_table {
                let rows: Vec<String> = lines
                    .iter()
                    .map(|line| {
                        format!(
                            "{{\"name\":{},\"zone\":{},\"status\":{},\"live\":{},\"maintenance\":{},\
                             \"load_permille\":{},\"copies\":{},\"daemons_running\":{},\"unsafe_copies\":{},\
                             \"avoid\":{},\"cordoned\":{}}}",
                            json_string(&line.name),
                            json_string(&line.zone),
                            json_string(&line.status),
                            line.live,
                            json_string(&line.maintenance),
                            line.load_permille,
                            line.copies,
                            line.daemons_running,
                            line.unsafe_copies,
                            line.avoid,
                            line.cordoned
                        )
                    })
                    .collect();
                format!(",\"node_table\":[{}]", rows.join(","))
            } else {
                String::new()
            }
        );
        return Ok(ExitCode::SUCCESS);
    }
    if node_table {
        println!(
            "{:<16} {:<8} {:<8} {:<22} {:>5} {:>7} {:>7} {:>7}  flags",
            "NODE", "ZONE", "STATUS", "MAINTENANCE", "LOAD", "COPIES", "DAEMONS", "UNSAFE"
        );
        for line in &lines {
            let mut flags = Vec::new();
            if !line.live {
                flags.push("not-live");
            }
            if line.avoid {
                flags.push("avoid");
            }
            if line.cordoned {
                flags.push("cordoned");
            }
            println!(
                "{:<16} {:<8} {:<8} {:<22} {:>5} {:>7} {:>7} {:>7}  {}",
                printable(&line.name),
                printable(&line.zone),
                line.status,
                line.maintenance,
                line.load_permille,
                line.copies,
                line.daemons_running,
                line.unsafe_copies,
                flags.join(",")
            );
        }
        println!();
    }
    println!(
        "snapshot {} ({}, format {}) written by `{}`",
        path.display(),
        bytes_text(file_bytes as u64),
        summary.format_version,
        printable(&summary.writer_node)
    );
    println!(
        "position={} state_hash={} log_time_ms={} events={}",
        summary.position,
        hash_hex(summary.state_hash),
        summary.log_time_ms,
        summary.events_applied
    );
    if !summary.fence.is_empty() {
        println!("FENCED: {}", printable(&summary.fence));
    }
    if summary.commitment_position > 0 {
        println!(
            "state commitments: at log position {}, {} of the {} nodes that committed there hold this node's hash",
            summary.commitment_position, summary.commitment_agreeing, summary.commitment_reporting
        );
    }
    if !summary.nodes_diverged.is_empty() {
        let names: Vec<String> = summary.nodes_diverged.iter().map(|name| printable(name).to_string()).collect();
        println!(
            "DIVERGED: {} committed a state hash the other nodes did not (at the same log position)",
            names.join(", ")
        );
    }
    println!("nodes: {} ({} live); status: {}", summary.nodes, summary.nodes_live, counts(&summary.nodes_by_status));
    println!("  maintenance: {}", counts(&summary.nodes_by_maintenance));
    for node in &summary.nodes_away {
        println!(
            "  {} {}: {} copies not safe elsewhere ({}, {} moving), {} daemons left, time to safe {}",
            printable(&node.node),
            node.maintenance,
            node.unsafe_copies,
            bytes_text(node.unsafe_bytes),
            node.moving_copies,
            node.daemons_left,
            eta(node.eta_ms)
        );
    }
    println!(
        "blobs: {}, copies: {}; drift: {} (copies missing {}, surplus {}); placement epoch {}, {} plans to recompute, {} copies off plan, {} pulling",
        summary.blobs,
        summary.copies,
        if summary.drift.is_empty() { "none".to_string() } else { counts(&summary.drift) },
        summary.copies_missing,
        summary.copies_surplus,
        summary.placement_epoch,
        summary.plans_invalid,
        summary.copies_off_plan,
        summary.copies_pulling
    );
    println!(
        "daemons: {} ({} running, {} not healthy, {} backing off, {} gated)",
        summary.daemons,
        summary.daemons_running,
        summary.daemons_unhealthy,
        summary.daemons_backing_off,
        summary.daemons_gated
    );
    println!(
        "actions in flight: {}{}{}",
        summary.actions_inflight,
        if summary.actions_by_kind.is_empty() { "" } else { ": " },
        counts(&summary.actions_by_kind)
    );
    println!(
        "held by a gate: {} blobs{}{}",
        summary.blobs_held,
        if summary.blobs_held_by_gate.is_empty() { "" } else { ": " },
        counts(&summary.blobs_held_by_gate)
    );
    println!(
        "gates: backpressure={} brake={} throttle {}/{} moves this window, moves in flight {}/{}; {} copies block drains",
        summary.backpressure,
        summary.brake,
        summary.window_moves,
        summary.throttle_moves_max,
        summary.moves_inflight,
        summary.pull_inflight_max,
        summary.drain_blockers
    );
    println!(
        "failures: {} events rejected, {} actions failed, {} timed out; {} RTT pairs measured",
        summary.rejected_total, summary.actions_failed, summary.actions_timed_out, summary.rtt_pairs
    );
    let nonzero = |counts: &[(String, u64)]| {
        let listed: Vec<String> = counts
            .iter()
            .filter(|(_, count)| *count > 0)
            .map(|(name, count)| format!("{}={count}", printable(name)))
            .collect();
        if listed.is_empty() {
            "none".to_string()
        } else {
            listed.join(" ")
        }
    };
    println!(
        "ingest of `{}`: {} connections open, {} frames in; partial frames {} of {} (peak {})",
        printable(&summary.writer_node),
        summary.ingest_connections_open,
        summary.ingest_frames_in,
        bytes_text(summary.ingest_partial_frame_bytes),
        bytes_text(summary.ingest_partial_frame_bytes_max),
        bytes_text(summary.ingest_partial_frame_bytes_peak)
    );
    println!(
        "  frames refused: {} ({})",
        summary.ingest_frame_errors.iter().map(|(_, count)| count).sum::<u64>(),
        nonzero(&summary.ingest_frame_errors)
    );
    println!("  connections refused, closed or held back by a limit: {}", nonzero(&summary.ingest_connection_refusals));
    Ok(ExitCode::SUCCESS)
}

fn duration_text(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1_000..=119_999 => format!("{:.1} s", ms as f64 / 1e3),
        _ => format!("{:.1} min", ms as f64 / 60e3),
    }
}

fn bytes_text(bytes: u64) -> String {
    match bytes {
        0..=1023 => format!("{bytes} B"),
        1_024..=1_048_575 => format!("{:.1} KiB", bytes as f64 / 1024.0),
        1_048_576..=1_073_741_823 => format!("{:.1} MiB", bytes as f64 / 1_048_576.0),
        _ => format!("{:.1} GiB", bytes as f64 / 1_073_741_824.0),
    }
}

fn print_preview(
    preview: &admin::preview::Preview,
    operator: &str,
    key: &admin::OperatorKey,
    key_path: &std::path::Path,
    node: &str,
    show: usize,
) {
    println!(
        "dry run: {} as `{}` (key {}... from {}) on node `{node}`'s log at position {}",
        preview.command,
        printable(operator),
        &key.public_key_hex()[..16],
        key_path.display(),
        preview.log_position
    );
    if let Some(tail) = &preview.log_tail {
        println!("  (the read stopped before a record that is incomplete or damaged: {tail})");
    }
    match &preview.rejection {
        None => println!("would be: applied"),
        Some((reason, message)) => println!("would be: REJECTED ({reason}): {}", printable(message)),
    }
    if preview.actions.is_empty() {
        println!("actions of the reconcile pass after it: none");
    } else {
        println!("actions of the reconcile pass after it ({}):", preview.actions.len());
        for action in &preview.actions {
            println!("  {}", printable(action));
        }
    }
    for impact in &preview.nodes {
        println!(
            "node `{}`: {} -> {}; {} healthy copies",
            printable(&impact.node),
            impact.maintenance_before,
            impact.maintenance_after,
            impact.healthy_copies
        );
        println!(
            "  copies to move first (below their intent without this node): {} ({})",
            impact.copies_to_move.len(),
            bytes_text(impact.bytes_to_move)
        );
        for copy in impact.copies_to_move.iter().take(show) {
            println!(
                "    blob {} ({}): {} counted copies elsewhere, needs {}",
                copy.blob,
                bytes_text(copy.size_bytes),
                copy.copies_elsewhere,
                copy.copies_needed
            );
        }
        if impact.copies_to_move.len() > show {
            println!("    ... and {} more (--show N, or -o json for all)", impact.copies_to_move.len() - show);
        }
        println!("  blobs left exactly at their intent without it (no margin): {}", impact.blobs_at_intent);
        match impact.time_to_safe_ms {
            Some(ms) => println!("  expected time to safe: {} (at the measured transfer rate)", duration_text(ms)),
            None => {
                println!("  expected time to safe: unknown (no move has finished yet, so no transfer rate is measured)")
            }
        }
        if impact.daemons_to_stop.is_empty() {
            println!("  daemons to stop: none");
        } else {
            println!(
                "  daemons to stop: {}",
                impact.daemons_to_stop.iter().map(|name| printable(name)).collect::<Vec<_>>().join(", ")
            );
        }
    }
    println!("nothing was appended (dry run)");
}

fn preview_json(preview: &admin::preview::Preview) -> String {
    let strings = |items: &[String]| items.iter().map(|item| json_string(item)).collect::<Vec<_>>().join(",");
    let rejection = preview.rejection.as_ref().map_or("null".to_string(), |(reason, message)| {
        format!("{{\"reason\":\"{reason}\",\"message\":{}}}", json_string(message))
    });
    let nodes: Vec<String> = preview
        .nodes
        .iter()
        .map(|impact| {
            let copies: Vec<String> = impact
                .copies_to_move
                .iter()
                .map(|copy| {
                    format!(
                        "{{\"blob\":\"{}\",\"size_bytes\":{},\"copies_elsewhere\":{},\"copies_needed\":{}}}",
                        copy.blob, copy.size_bytes, copy.copies_elsewhere, copy.copies_needed
                    )
                })
                .collect();
            format!(
                "{{\"node\":{},\"maintenance_before\":\"{}\",\"maintenance_after\":\"{}\",\"healthy_copies\":{},\
                 \"copies_to_move\":[{}],\"bytes_to_move\":{},\"blobs_at_intent\":{},\"time_to_safe_ms\":{},\
                 \"daemons_to_stop\":[{}]}}",
                json_string(&impact.node),
                impact.maintenance_before,
                impact.maintenance_after,
                impact.healthy_copies,
                copies.join(","),
                impact.bytes_to_move,
                impact.blobs_at_intent,
                impact.time_to_safe_ms.map_or("null".to_string(), |ms| ms.to_string()),
                strings(&impact.daemons_to_stop)
            )
        })
        .collect();
    format!(
        "{{\"dry_run\":true,\"command\":\"{}\",\"log_position\":{},\"log_tail\":{},\"applied\":{},\"rejection\":{},\
         \"actions\":[{}],\"nodes\":[{}],\"appended\":false}}",
        preview.command,
        preview.log_position,
        preview.log_tail.as_ref().map_or("null".to_string(), |tail| json_string(tail)),
        preview.applied,
        rejection,
        strings(&preview.actions),
        nodes.join(",")
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A command that prints (status, logs, tables) ends quietly when its reader goes
    // away (`| head`), like any Unix tool; what talks to sockets (a node, the demo, a
    // daemon) keeps SIGPIPE ignored so a vanished peer is an error, not its death.
    if !matches!(cli.command, Command::Node { .. } | Command::Demo { .. } | Command::DemoWorker) {
        // SAFETY: signal(2) with SIG_DFL installs no handler and reads no memory.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(1)
        }
    }
}
