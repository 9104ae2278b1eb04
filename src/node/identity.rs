//! A node's identity at start: its own ed25519 key (`[cluster] node_key_file`,
//! created with mode 0600 at the first start) and its cluster's genesis
//! (`[cluster] genesis_file`). A clustered node must be given the genesis (`meshos
//! cluster init` writes it); a single machine's first start writes one for itself,
//! with a new operator key in `DATA_DIR/admin.key` (0600) and itself admitted, the
//! way a first `k3s server` writes its own admin credentials: trust comes from the
//! operator's disk, never from the first event that reaches a port.
//!
//! Invariants: an existing genesis or key is never replaced; every file this writes
//! holds a secret only when it is mode 0600.

use std::path::{Path, PathBuf};

use crate::node::config::NodeConfig;
use crate::trust::{Genesis, KeyPair, Sealer, TrustError};

/// The file a single machine's first start writes its operator key to.
pub const ADMIN_KEY_FILE: &str = "admin.key";

/// What a node signs with and trusts.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub key: KeyPair,
    pub genesis: Genesis,
    /// What the start created, for the log (key, genesis, operator key).
    pub created: Vec<String>,
}

impl NodeIdentity {
    /// The sealer of this node's records.
    pub fn sealer(&self, name: &str) -> Sealer {
        Sealer::node(name, self.key.clone(), self.genesis.cluster_id())
    }

    /// Whether the genesis admits this node's key from the start (else an operator
    /// admits it with `meshos admin admit-node`).
    pub fn admitted_at_genesis(&self, name: &str) -> bool {
        self.genesis.nodes().iter().any(|(node, key)| node == name && key == &self.key.public_key())
    }
}

/// Loads (or, on a first start, creates) the node's key and genesis (module docs).
pub fn prepare(config: &NodeConfig) -> Result<NodeIdentity, TrustError> {
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|source| TrustError::Io { path: config.data_dir.clone(), source })?;
    let mut created = Vec::new();
    let key_path = config.node_key_path();
    let (key, new_key) = KeyPair::load_or_create(&key_path)?;
    if new_key {
        created.push(format!("created this node's key {} (public {})", key_path.display(), key.public_key_hex()));
    }
    let genesis_path = config.genesis_path();
    let genesis = if genesis_path.exists() {
        Genesis::load(&genesis_path)?
    } else if config.clustered() {
        return Err(TrustError::Genesis {
            path: genesis_path,
            reason: "missing: every node of a cluster loads the genesis `meshos cluster init` wrote (copy it here, or \
                     name it in [cluster] genesis_file)"
                .to_string(),
        });
    } else {
        let admin_path = config.data_dir.join(ADMIN_KEY_FILE);
        let operator = KeyPair::generate(&admin_path)?;
        let genesis = Genesis::generate(vec![operator.public_key()], vec![(config.name.clone(), key.public_key())])?;
        genesis.write_new(&genesis_path)?;
        created.push(format!(
            "initialized a new cluster {} with this node admitted: genesis {}, operator key {} (keep it secret; \
             `meshos admin` and `meshos daemon` use it)",
            genesis.cluster_id_hex(),
            genesis_path.display(),
            admin_path.display()
        ));
        genesis
    };
    Ok(NodeIdentity { key, genesis, created })
}

/// Logs a warning naming the command that admits this node when the folded state does
/// not admit its key (yet): nothing it signs is folded until then.
pub fn warn_if_not_admitted(name: &str, identity: &NodeIdentity, state: &crate::state::State) {
    if state.keyring.node_key(name) != Some(identity.key.public_key()) {
        tracing::warn!(
            node = name,
            "this node's key is not admitted (yet): nothing it signs is folded; an operator runs `meshos admin \
             admit-node {name} --node-key {}`",
            identity.key.public_key_hex()
        );
    }
}

/// The node's key and genesis as they are, for tools acting for the node (`meshos
/// get`): never creates either.
pub fn load(config: &NodeConfig) -> Result<NodeIdentity, TrustError> {
    Ok(NodeIdentity {
        key: KeyPair::load(&config.node_key_path())?,
        genesis: load_genesis(config)?,
        created: Vec::new(),
    })
}

/// The genesis a node uses, for tools that read its log (never creates one).
pub fn load_genesis(config: &NodeConfig) -> Result<Genesis, TrustError> {
    Genesis::load(&config.genesis_path())
}

/// The operator key a CLI command signs with: `--key FILE` if given, else the
/// node's `DATA_DIR/admin.key` when it exists.
pub fn operator_key(config: &NodeConfig, key: Option<&Path>) -> Result<(KeyPair, PathBuf), TrustError> {
    let path = match key {
        Some(path) => path.to_path_buf(),
        None => config.data_dir.join(ADMIN_KEY_FILE),
    };
    if key.is_none() && !path.exists() {
        return Err(TrustError::Io {
            path,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no operator key: pass --key FILE (an operator key in the cluster keyring)",
            ),
        });
    }
    Ok((KeyPair::load(&path)?, path))
}

/// The keys the folded state admits, for the transports (the peer port and its
/// clients): node name to admitted key, and the operator keys. The node loop calls
/// `refresh` after fold; it rebuilds only when the keyring changed (`Keyring::changes`),
/// so an admission or a removal reaches the transports at the next loop turn.
#[derive(Debug, Default)]
pub struct StateKeys {
    view: std::sync::RwLock<KeysView>,
}

#[derive(Debug, Default)]
struct KeysView {
    /// `Keyring::changes` when built (`u64::MAX`: never built).
    changes: u64,
    nodes: std::collections::HashMap<Box<str>, crate::trust::PublicKey>,
    operators: Vec<crate::trust::PublicKey>,
}

impl StateKeys {
    pub fn from_state(state: &crate::state::State) -> std::sync::Arc<StateKeys> {
        let keys = StateKeys { view: std::sync::RwLock::new(KeysView { changes: u64::MAX, ..KeysView::default() }) };
        keys.refresh(state);
        std::sync::Arc::new(keys)
    }

    /// Takes the state's admitted keys if the keyring changed since the last call.
    pub fn refresh(&self, state: &crate::state::State) {
        let keyring = &state.keyring;
        let stale = self.view.read().map_or(true, |view| view.changes != keyring.changes);
        if !stale {
            return;
        }
        let mut nodes = std::collections::HashMap::with_capacity(keyring.identities());
        for row in 0..keyring.identities() {
            if !keyring.identity_revoked[row] {
                nodes.insert(keyring.identity_name[row].clone(), keyring.identity_key[row]);
            }
        }
        let view = KeysView { changes: keyring.changes, nodes, operators: keyring.keys.clone() };
        match self.view.write() {
            Ok(mut guard) => *guard = view,
            Err(poisoned) => *poisoned.into_inner() = view,
        }
    }
}

impl crate::sys::secure::PeerKeys for StateKeys {
    fn node_key(&self, name: &str) -> Option<[u8; 32]> {
        self.view.read().ok()?.nodes.get(name).copied()
    }

    fn is_operator_key(&self, key: &[u8; 32]) -> bool {
        self.view.read().is_ok_and(|view| view.operators.contains(key))
    }
}
