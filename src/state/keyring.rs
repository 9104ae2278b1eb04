//! The keyring: whom the log trusts. The cluster id; the operators' ed25519 keys
//! (versioned: the genesis is version 1, every rotation a signed `SetKeyring` of the
//! next version); the node identities (one admitted key per node name, revocable);
//! and the replay window of operator sections: every (expires_ms, nonce) applied and
//! not yet expired, so a copied operator section is refused while it is still valid
//! and by its expiry afterwards, with no dependence on the signer's clock being
//! monotonic or on one signer at a time.
//!
//! Invariants: `version == 0` exactly when `keys` is empty (no genesis: nothing is
//! trusted); `keys` holds no duplicate and at most `keyring_keys_max` keys; identity
//! columns have one length, `identity_index` maps each name to its row (rows are
//! never removed: a removed node keeps its row, revoked); the replay window holds at
//! most `operator_nonces_max` entries and none expired before `now_ms` of the last
//! pruning; lookups in `keys` are linear over a short bounded list; nothing depends
//! on hash-map order. Only fold mutates it (and `State::new`, from the genesis); it is
//! part of the state hash.

use std::collections::BTreeSet;

use hashbrown::HashMap;

use super::hash::StateHasher;
use crate::trust::{ClusterId, Genesis};

/// An ed25519 public key, 32 bytes.
pub type PublicKey = [u8; 32];

#[derive(Debug, Clone, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Keyring {
    /// The cluster id every signature binds (from the genesis).
    pub cluster_id: ClusterId,
    /// Version of the operator keys (0: no genesis).
    pub version: u64,
    /// Operator keys of the current version, in the order given.
    pub keys: Vec<PublicKey>,
    /// Admitted node names, in order of first admission.
    pub identity_name: Vec<Box<str>>,
    /// The admitted key per identity row.
    pub identity_key: Vec<PublicKey>,
    /// True once the node was removed: its key signs nothing any more.
    pub identity_revoked: Vec<bool>,
    /// Name to identity row; not checkpointed (`rebuild_index`).
    #[rkyv(with = rkyv::with::Skip)]
    pub identity_index: HashMap<Box<str>, u32>,
    /// Operator sections applied and not yet expired: (expires_ms, nonce).
    pub operator_window: BTreeSet<(u64, [u8; 16])>,
    /// Bumped whenever a key is admitted, revoked or rotated, so a node refreshes what
    /// its transports trust only then. Not state: not hashed, not checkpointed (0 after
    /// a load, when a node reads every key anyway).
    #[rkyv(with = rkyv::with::Skip)]
    pub changes: u64,
}

impl PartialEq for Keyring {
    fn eq(&self, other: &Self) -> bool {
        self.cluster_id == other.cluster_id
            && self.version == other.version
            && self.keys == other.keys
            && self.identity_name == other.identity_name
            && self.identity_key == other.identity_key
            && self.identity_revoked == other.identity_revoked
            && self.operator_window == other.operator_window
    }
}

impl Eq for Keyring {}

impl Keyring {
    /// The keyring a genesis starts a cluster with (`Genesis::none()`: trusts nothing).
    pub fn from_genesis(genesis: &Genesis) -> Keyring {
        let mut keyring = Keyring { cluster_id: genesis.cluster_id(), ..Keyring::default() };
        if !genesis.is_none() {
            keyring.version = 1;
            keyring.keys = genesis.operator_keys().to_vec();
        }
        for (name, key) in genesis.nodes() {
            keyring.admit(name, key);
        }
        keyring
    }

    pub fn contains(&self, key: &PublicKey) -> bool {
        self.keys.contains(key)
    }

    pub fn identities(&self) -> usize {
        self.identity_name.len()
    }

    /// The identity row of node `name`.
    pub fn identity(&self, name: &str) -> Option<usize> {
        self.identity_index.get(name).map(|&row| row as usize)
    }

    /// Whether `key` is node `name`'s admitted, unrevoked key.
    pub fn node_key_is(&self, name: &str, key: &PublicKey) -> bool {
        self.identity(name).is_some_and(|row| !self.identity_revoked[row] && &self.identity_key[row] == key)
    }

    /// Node `name`'s admitted, unrevoked key.
    pub fn node_key(&self, name: &str) -> Option<PublicKey> {
        self.identity(name).filter(|&row| !self.identity_revoked[row]).map(|row| self.identity_key[row])
    }

    /// Admits `name` with `key` (a known name gets the new key and is no longer
    /// revoked); the caller checked the name, the key and the row limit.
    pub fn admit(&mut self, name: &str, key: &PublicKey) {
        self.changes += 1;
        match self.identity(name) {
            Some(row) => {
                self.identity_key[row] = *key;
                self.identity_revoked[row] = false;
            }
            None => {
                let row = u32::try_from(self.identity_name.len()).expect("identities are bounded by nodes_max");
                self.identity_name.push(name.into());
                self.identity_key.push(*key);
                self.identity_revoked.push(false);
                self.identity_index.insert(name.into(), row);
            }
        }
    }

    /// Revokes `name`'s key; false when the name was never admitted.
    pub fn revoke(&mut self, name: &str) -> bool {
        let Some(row) = self.identity(name) else { return false };
        self.changes += 1;
        self.identity_revoked[row] = true;
        true
    }

    /// Installs `keys` as version `version`; the caller checked the version and list.
    pub fn install(&mut self, version: u64, keys: &[PublicKey]) {
        assert!(version == self.version + 1 && !keys.is_empty(), "keyring versions go up by one");
        self.changes += 1;
        self.version = version;
        self.keys.clear();
        self.keys.extend_from_slice(keys);
    }

    /// Forgets replay-window entries that expired before `now_ms` (a section past its
    /// expiry is refused by its expiry, so it no longer needs its nonce kept).
    pub fn prune_window(&mut self, now_ms: u64) {
        if self.operator_window.first().is_some_and(|&(expires_ms, _)| expires_ms < now_ms) {
            self.operator_window = self.operator_window.split_off(&(now_ms, [0; 16]));
        }
    }

    /// Rebuilds `identity_index` (after a checkpoint is loaded).
    pub fn rebuild_index(&mut self) -> Result<(), String> {
        self.identity_index = HashMap::with_capacity(self.identity_name.len());
        for (row, name) in self.identity_name.iter().enumerate() {
            if self.identity_index.insert(name.clone(), row as u32).is_some() {
                return Err(format!("identity `{name}` has two rows"));
            }
        }
        Ok(())
    }

    pub fn check_invariants(&self, keys_max: u32, identities_max: u32, window_max: u32) {
        if let Err(what) = self.verify_invariants(keys_max, identities_max, window_max) {
            panic!("{what}");
        }
    }

    /// The invariants of the module docs; the error names the first broken one.
    pub fn verify_invariants(&self, keys_max: u32, identities_max: u32, window_max: u32) -> Result<(), String> {
        let fail = |what: &str| Err(what.to_string());
        if (self.version == 0) != self.keys.is_empty() {
            return fail("keyring version and keys out of step");
        }
        if self.keys.len() > keys_max as usize {
            return fail("keyring past keyring_keys_max");
        }
        for (index, key) in self.keys.iter().enumerate() {
            if self.keys[..index].contains(key) {
                return fail("duplicate key in the keyring");
            }
        }
        let rows = self.identity_name.len();
        if self.identity_key.len() != rows || self.identity_revoked.len() != rows {
            return fail("identity columns out of step");
        }
        if rows > identities_max as usize {
            return fail("identities past nodes_max");
        }
        if self.identity_index.len() != rows
            || self.identity_name.iter().enumerate().any(|(row, name)| self.identity(name) != Some(row))
        {
            return fail("identity index does not match the names");
        }
        if self.operator_window.len() > window_max as usize {
            return fail("operator replay window past operator_nonces_max");
        }
        Ok(())
    }

    pub fn hash_into(&self, hasher: &mut StateHasher) {
        hasher.section("keyring", self.keys.len());
        hasher.fixed(&self.cluster_id);
        hasher.u64(self.version);
        for key in &self.keys {
            hasher.fixed(key);
        }
        hasher.section("identities", self.identity_name.len());
        for row in 0..self.identity_name.len() {
            hasher.str(&self.identity_name[row]);
            hasher.fixed(&self.identity_key[row]);
            hasher.bool(self.identity_revoked[row]);
        }
        hasher.section("operator_window", self.operator_window.len());
        for (expires_ms, nonce) in &self.operator_window {
            hasher.u64(*expires_ms);
            hasher.fixed(nonce);
        }
    }
}

/// The first 8 bytes of a key as hex: enough to name it in messages.
pub fn key_prefix_hex(key: &PublicKey) -> String {
    crate::event::hex(&key[..8])
}
