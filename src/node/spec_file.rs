//! A daemon spec file (TOML), as `meshos daemon apply` reads it: what the daemon is,
//! how it is supervised and where it runs. Every field but `name` and `command` is
//! optional with the anchors' defaults; unknown fields are refused.
//!
//! ```toml
//! name = "cache"
//! command = "/usr/local/bin/cache-daemon"
//! args = ["--port", "7700"]
//! working_dir = ""            # empty: DATA_DIR/daemons/NAME
//! essential = false           # essential daemons keep running in maintenance
//! health_timeout_ms = 30000   # restart when health reports stop this long; 0: no check
//! stop_grace_ms = 10000       # control event, SIGTERM at half, SIGKILL at the end
//! runs_on = "all"             # or { label = "ssd" }, or { nodes = ["node-1"] }
//!
//! [env]
//! CACHE_SIZE = "1G"
//!
//! [restart]                   # the defaults
//! backoff_base_ms = 1000
//! backoff_max_ms = 300000
//! reset_after_ms = 600000
//! crash_loop_limit = 5
//! crash_loop_window_ms = 60000
//! ```
//!
//! Invariants: a parsed file yields a spec fold accepts on its own terms (name and
//! command present, 0 < backoff base <= max, crash-loop limit and window above 0);
//! env keys come out sorted (the order of a TOML table is not meaningful).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::event::{DaemonPlacement, DaemonSpec, EnvVar, RestartPolicy};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecFile {
    name: String,
    command: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    working_dir: String,
    #[serde(default)]
    essential: bool,
    #[serde(default)]
    health_timeout_ms: u32,
    #[serde(default = "default_stop_grace_ms")]
    stop_grace_ms: u32,
    #[serde(default)]
    restart: RestartFile,
    #[serde(default)]
    runs_on: RunsOn,
}

fn default_stop_grace_ms() -> u32 {
    10_000
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RestartFile {
    backoff_base_ms: u32,
    backoff_max_ms: u32,
    reset_after_ms: u32,
    crash_loop_limit: u16,
    crash_loop_window_ms: u32,
}

impl Default for RestartFile {
    fn default() -> Self {
        let policy = RestartPolicy::default();
        RestartFile {
            backoff_base_ms: policy.backoff_base_ms,
            backoff_max_ms: policy.backoff_max_ms,
            reset_after_ms: policy.reset_after_ms,
            crash_loop_limit: policy.crash_loop_limit,
            crash_loop_window_ms: policy.crash_loop_window_ms,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(untagged)]
enum RunsOn {
    #[default]
    #[serde(skip)]
    All,
    Word(String),
    Label {
        label: String,
    },
    Nodes {
        nodes: Vec<String>,
    },
}

/// Reads a spec file; the error names the file and the field.
pub fn load(path: &Path) -> Result<(DaemonSpec, DaemonPlacement), String> {
    let text = std::fs::read_to_string(path).map_err(|error| format!("{}: {error}", path.display()))?;
    parse(&text).map_err(|reason| format!("{}: {reason}", path.display()))
}

/// Parses spec text.
pub fn parse(text: &str) -> Result<(DaemonSpec, DaemonPlacement), String> {
    let file: SpecFile = toml::from_str(text).map_err(|error| error.to_string().trim_end().to_string())?;
    let field = |name: &str, reason: &str| Err(format!("field `{name}`: {reason}"));
    if file.name.is_empty() {
        return field("name", "must not be empty");
    }
    if file.command.is_empty() {
        return field("command", "must not be empty");
    }
    let restart = &file.restart;
    if restart.backoff_base_ms == 0 || restart.backoff_max_ms < restart.backoff_base_ms {
        return field("restart.backoff_base_ms", "needs 0 < backoff_base_ms <= backoff_max_ms");
    }
    if restart.crash_loop_limit == 0 || restart.crash_loop_window_ms == 0 {
        return field("restart.crash_loop_limit", "the crash-loop limit and window must be above 0");
    }
    let runs_on = match file.runs_on {
        RunsOn::All => DaemonPlacement::AllNodes,
        RunsOn::Word(word) if word == "all" => DaemonPlacement::AllNodes,
        RunsOn::Word(word) => {
            return field("runs_on", &format!("`{word}`: use \"all\", {{ label = .. }} or {{ nodes = [..] }}"))
        }
        RunsOn::Label { label } => DaemonPlacement::Label(label),
        RunsOn::Nodes { nodes } if nodes.is_empty() => return field("runs_on.nodes", "lists no node"),
        RunsOn::Nodes { nodes } => DaemonPlacement::Nodes(nodes),
    };
    let spec = DaemonSpec {
        name: file.name,
        command: file.command,
        args: file.args,
        env: file.env.into_iter().map(|(key, value)| EnvVar { key, value }).collect(),
        working_dir: file.working_dir,
        essential: file.essential,
        health_timeout_ms: file.health_timeout_ms,
        restart: RestartPolicy {
            backoff_base_ms: restart.backoff_base_ms,
            backoff_max_ms: restart.backoff_max_ms,
            reset_after_ms: restart.reset_after_ms,
            crash_loop_limit: restart.crash_loop_limit,
            crash_loop_window_ms: restart.crash_loop_window_ms,
        },
        stop_grace_ms: file.stop_grace_ms,
    };
    Ok((spec, runs_on))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_parses_with_its_defaults() {
        let doc = include_str!("spec_file.rs");
        let example: String = doc
            .lines()
            .skip_while(|line| !line.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|line| !line.starts_with("//! ```"))
            .map(|line| format!("{}\n", line.trim_start_matches("//!").trim_start()))
            .collect();
        let (spec, runs_on) = parse(&example).unwrap();
        assert_eq!(spec.name, "cache");
        assert_eq!(spec.restart, RestartPolicy::default());
        assert_eq!(spec.env, vec![EnvVar { key: "CACHE_SIZE".into(), value: "1G".into() }]);
        assert_eq!(runs_on, DaemonPlacement::AllNodes);
        let minimal = parse("name = \"a\"\ncommand = \"/bin/true\"\n").unwrap();
        assert_eq!((minimal.0.stop_grace_ms, minimal.1), (10_000, DaemonPlacement::AllNodes));
        let labelled = parse("name = \"a\"\ncommand = \"x\"\nruns_on = { label = \"ssd\" }\n").unwrap();
        assert_eq!(labelled.1, DaemonPlacement::Label("ssd".into()));
    }

    #[test]
    fn bad_files_name_the_field() {
        for (text, field) in [
            ("command = \"x\"", "name"),
            ("name = \"a\"\ncommand = \"\"", "command"),
            ("name = \"a\"\ncommand = \"x\"\n[restart]\nbackoff_base_ms = 0", "backoff_base_ms"),
            ("name = \"a\"\ncommand = \"x\"\nruns_on = \"some\"", "runs_on"),
            ("name = \"a\"\ncommand = \"x\"\ncolour = 1", "colour"),
        ] {
            let error = parse(text).unwrap_err();
            assert!(error.contains(field), "`{text}` gave `{error}`");
        }
    }
}
