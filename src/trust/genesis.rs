//! A cluster's genesis: its first operator keys and the nodes admitted from the
//! start, and the cluster id derived from them. It comes from the operator (`meshos
//! cluster init`, or a single node's first start writing one for itself), never from
//! the first event that reaches a port or the stream: fold starts from it
//! (`State::new` installs it), so every node of a cluster must load the same file.
//!
//! File (`genesis.toml`), written by `to_toml`, read by `parse`:
//!
//! ```toml
//! salt = "<32 hex digits: 16 random bytes>"
//! operator_keys = ["<64 hex digits>", ...]
//! [[nodes]]
//! name = "node-1"
//! key = "<64 hex digits>"
//! ```
//!
//! The cluster id is blake3 of a domain label, the salt, the operator keys and the
//! nodes (lengths framed), cut to 16 bytes: editing the file makes another cluster,
//! whose nodes refuse every record of the first (the id is in every signature).
//!
//! Invariants: a `Genesis` built by `new` or `parse` has valid, distinct keys and
//! valid, distinct node names; `cluster_id` is a pure function of the contents.

use std::path::Path;

use super::keys::{is_public_key, parse_hex_bytes, test_key_of, KeyPair, PublicKey};
use super::record::ClusterId;
use super::{check_node_name, TrustError};

/// The genesis of one cluster (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Genesis {
    salt: [u8; 16],
    operator_keys: Vec<PublicKey>,
    nodes: Vec<(String, PublicKey)>,
    cluster_id: ClusterId,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GenesisFile {
    salt: String,
    operator_keys: Vec<String>,
    #[serde(default)]
    nodes: Vec<NodeEntry>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeEntry {
    name: String,
    key: String,
}

impl Genesis {
    /// A client's secure channel (the ingest port's, `sys::client::Client::connect_tcp`)
    /// as `local`, trusting the nodes this genesis names with their genesis keys. A
    /// node admitted later is not among them: its clients name it with
    /// `SecureConfig::towards_node`.
    pub fn client_secure(
        &self,
        local: crate::sys::secure::LocalIdentity,
    ) -> std::sync::Arc<crate::sys::secure::SecureConfig> {
        let keys = crate::sys::secure::StaticPeerKeys {
            nodes: self.nodes.iter().cloned().collect(),
            operators: self.operator_keys.clone(),
        };
        std::sync::Arc::new(crate::sys::secure::SecureConfig {
            cluster_id: self.cluster_id,
            local,
            keys: std::sync::Arc::new(keys),
            accept_operators: false,
            message_bytes_max: crate::sys::secure::SINGLE_FRAME_MESSAGE_BYTES_MAX as u32,
        })
    }

    /// No genesis: no key is trusted, every record is refused. `Config::default()`
    /// carries it; a node always loads a real one.
    pub fn none() -> Genesis {
        Genesis::default()
    }

    pub fn is_none(&self) -> bool {
        self.operator_keys.is_empty()
    }

    /// A genesis of these keys and nodes; the error names the first bad entry.
    pub fn new(
        salt: [u8; 16],
        operator_keys: Vec<PublicKey>,
        nodes: Vec<(String, PublicKey)>,
    ) -> Result<Genesis, String> {
        if operator_keys.is_empty() {
            return Err("a genesis needs at least one operator key".into());
        }
        for (index, key) in operator_keys.iter().enumerate() {
            if !is_public_key(key) {
                return Err(format!("operator key {} is not an ed25519 public key", crate::event::hex(key)));
            }
            if operator_keys[..index].contains(key) {
                return Err(format!("operator key {} appears twice", crate::event::hex(key)));
            }
        }
        for (index, (name, key)) in nodes.iter().enumerate() {
            check_node_name(name).map_err(|error| format!("node `{}`: {error}", name.escape_debug()))?;
            if !is_public_key(key) {
                return Err(format!("node {name}: key {} is not an ed25519 public key", crate::event::hex(key)));
            }
            if nodes[..index].iter().any(|(other, _)| other == name) {
                return Err(format!("node {name} appears twice"));
            }
        }
        let mut genesis = Genesis { salt, operator_keys, nodes, cluster_id: [0; 16] };
        genesis.cluster_id = genesis.derive_id();
        Ok(genesis)
    }

    /// A fresh genesis with a random salt.
    pub fn generate(operator_keys: Vec<PublicKey>, nodes: Vec<(String, PublicKey)>) -> Result<Genesis, TrustError> {
        let mut salt = [0u8; 16];
        crate::sys::process::random_bytes(&mut salt)
            .map_err(|source| TrustError::Io { path: "/dev/urandom".into(), source })?;
        Genesis::new(salt, operator_keys, nodes).map_err(|reason| TrustError::Genesis { path: "(new)".into(), reason })
    }

    fn derive_id(&self) -> ClusterId {
        let mut hasher = blake3::Hasher::new_derive_key("meshos 2026 cluster id of a genesis");
        hasher.update(&self.salt);
        hasher.update(&(self.operator_keys.len() as u64).to_le_bytes());
        for key in &self.operator_keys {
            hasher.update(key);
        }
        hasher.update(&(self.nodes.len() as u64).to_le_bytes());
        for (name, key) in &self.nodes {
            hasher.update(&(name.len() as u64).to_le_bytes());
            hasher.update(name.as_bytes());
            hasher.update(key);
        }
        hasher.finalize().as_bytes()[..16].try_into().expect("16 bytes")
    }

    pub fn cluster_id(&self) -> ClusterId {
        self.cluster_id
    }

    pub fn cluster_id_hex(&self) -> String {
        crate::event::hex(&self.cluster_id)
    }

    pub fn operator_keys(&self) -> &[PublicKey] {
        &self.operator_keys
    }

    pub fn nodes(&self) -> &[(String, PublicKey)] {
        &self.nodes
    }

    /// The genesis file's text.
    pub fn to_toml(&self) -> String {
        use std::fmt::Write;
        let mut text = format!(
            "# MeshOS cluster genesis (cluster id {}). Every node of the cluster loads this same file;\n\
             # editing it makes another cluster. Public: it holds no secret.\n",
            self.cluster_id_hex()
        );
        let _ = writeln!(text, "salt = \"{}\"", crate::event::hex(&self.salt));
        let keys: Vec<String> =
            self.operator_keys.iter().map(|key| format!("\"{}\"", crate::event::hex(key))).collect();
        let _ = writeln!(text, "operator_keys = [{}]", keys.join(", "));
        for (name, key) in &self.nodes {
            let _ = write!(text, "\n[[nodes]]\nname = \"{name}\"\nkey = \"{}\"\n", crate::event::hex(key));
        }
        text
    }

    /// Parses a genesis file's text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Genesis, TrustError> {
        let bad = |reason: String| TrustError::Genesis { path: path.to_path_buf(), reason };
        let file: GenesisFile = toml::from_str(text).map_err(|error| bad(error.to_string()))?;
        let salt_bytes = file.salt.as_bytes();
        let salt = (salt_bytes.len() == 32)
            .then(|| {
                let mut padded = [b'0'; 64];
                padded[32..].copy_from_slice(salt_bytes);
                parse_hex_bytes(&padded).map(|bytes| <[u8; 16]>::try_from(&bytes[16..]).expect("16 bytes"))
            })
            .flatten()
            .ok_or_else(|| bad(format!("salt `{}` is not 32 hex digits", file.salt)))?;
        let key = |what: &str, text: &str| {
            parse_hex_bytes(text.as_bytes()).ok_or_else(|| bad(format!("{what} `{text}` is not 64 hex digits")))
        };
        let operator_keys =
            file.operator_keys.iter().map(|text| key("operator key", text)).collect::<Result<_, _>>()?;
        let nodes = file
            .nodes
            .iter()
            .map(|entry| Ok((entry.name.clone(), key("node key", &entry.key)?)))
            .collect::<Result<_, TrustError>>()?;
        Genesis::new(salt, operator_keys, nodes).map_err(bad)
    }

    pub fn load(path: &Path) -> Result<Genesis, TrustError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| TrustError::Io { path: path.to_path_buf(), source })?;
        Genesis::parse(&text, path)
    }

    /// Writes the genesis file atomically; refuses to replace an existing one.
    pub fn write_new(&self, path: &Path) -> Result<(), TrustError> {
        if path.exists() {
            return Err(TrustError::Genesis {
                path: path.to_path_buf(),
                reason: "already exists: refusing to replace a cluster's genesis".into(),
            });
        }
        crate::sys::files::write_atomically(path, self.to_toml().as_bytes())
            .map_err(|(path, source)| TrustError::Io { path, source })
    }

    /// The genesis of tests, the simulator and generated logs: the operator key
    /// `trust::test_operator_key()` and the nodes `names` with `test_key_of(name)`.
    /// Its keys are public in the code: never a real cluster's.
    pub fn for_tests<S: AsRef<str>>(names: &[S]) -> Genesis {
        let nodes =
            names.iter().map(|name| (name.as_ref().to_string(), test_key_of(name.as_ref()).public_key())).collect();
        Genesis::new([0x7e; 16], vec![test_operator_key().public_key()], nodes).expect("test names are valid")
    }
}

/// The fixed operator key of tests, the simulator and `meshos log gen` (seed: 32
/// bytes of 0x5e). Public in the code, so never trust it in a real genesis.
pub fn test_operator_key() -> KeyPair {
    KeyPair::from_seed([0x5e; 32])
}
