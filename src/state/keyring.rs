//! The cluster keyring: the operators' ed25519 public keys whose signed admin events
//! fold applies, and the last admin sequence number applied from every key ever seen.
//!
//! The keyring lives in the log like everything else: its first version (genesis) is
//! a `SetKeyring { version: 1 }` signed by one of the keys it installs (trust on first
//! use), and every later version is a `SetKeyring` signed by a key of the current one
//! (key rotation). `seen` remembers every key any version installed, with the last
//! `admin_seq` applied from it, and keeps rotated-out keys: a key removed and later
//! added back cannot replay the events it signed before.
//!
//! Invariants: `version == 0` exactly when `keys` is empty (no keyring yet); `keys`
//! holds no duplicate and at most `keyring_keys_max` keys; every key of `keys` is in
//! `seen`; `seen` never shrinks and holds at most `admin_keys_seen_max` keys, in order
//! of first installation; lookups are linear scans over these short, bounded lists,
//! so nothing depends on hash-map order. Only fold mutates it; it is part of the
//! state hash.

use super::hash::StateHasher;

/// An ed25519 public key, 32 bytes.
pub type PublicKey = [u8; 32];

#[derive(Debug, Clone, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Keyring {
    /// Version of the current keyring (0: none yet).
    pub version: u64,
    /// Keys of the current version, in the order the `SetKeyring` gave them.
    pub keys: Vec<PublicKey>,
    /// Every key any version installed, in order of first installation.
    pub seen: Vec<PublicKey>,
    /// Per key of `seen`: the last `admin_seq` applied from it (0: none yet).
    pub admin_seq_last: Vec<u64>,
}

impl Keyring {
    pub fn contains(&self, key: &PublicKey) -> bool {
        self.keys.contains(key)
    }

    /// The row of `key` in `seen`.
    pub fn seen_row(&self, key: &PublicKey) -> Option<usize> {
        self.seen.iter().position(|seen| seen == key)
    }

    /// The last admin sequence number applied from `key` (0 when none was).
    pub fn last_admin_seq(&self, key: &PublicKey) -> u64 {
        self.seen_row(key).map_or(0, |row| self.admin_seq_last[row])
    }

    /// How many keys of `keys` `seen` does not hold yet.
    pub fn unseen_count(&self, keys: &[PublicKey]) -> usize {
        keys.iter().filter(|key| self.seen_row(key).is_none()).count()
    }

    /// Installs `keys` as version `version`; the caller checked the version, the
    /// list and that `seen` has room (`unseen_count`).
    pub fn install(&mut self, version: u64, keys: &[PublicKey]) {
        assert!(version == self.version + 1 && !keys.is_empty(), "keyring versions go up by one");
        for key in keys {
            if self.seen_row(key).is_none() {
                self.seen.push(*key);
                self.admin_seq_last.push(0);
            }
        }
        self.version = version;
        self.keys.clear();
        self.keys.extend_from_slice(keys);
    }

    /// Records `admin_seq` as the last applied from `key` (which is in `seen`).
    pub fn record(&mut self, key: &PublicKey, admin_seq: u64) {
        let row = self.seen_row(key).expect("a key that signed an applied admin event was installed");
        assert!(admin_seq > self.admin_seq_last[row], "admin sequence numbers strictly increase per key");
        self.admin_seq_last[row] = admin_seq;
    }

    pub fn check_invariants(&self, keys_max: u32, seen_max: u32) {
        if let Err(what) = self.verify_invariants(keys_max, seen_max) {
            panic!("{what}");
        }
    }

    /// The invariants of the module docs; the error names the first broken one.
    pub fn verify_invariants(&self, keys_max: u32, seen_max: u32) -> Result<(), String> {
        let fail = |what: &str| Err(what.to_string());
        if (self.version == 0) != self.keys.is_empty() {
            return fail("keyring version and keys out of step");
        }
        if self.keys.len() > keys_max as usize {
            return fail("keyring past keyring_keys_max");
        }
        if self.seen.len() > seen_max as usize {
            return fail("seen keys past admin_keys_seen_max");
        }
        if self.seen.len() != self.admin_seq_last.len() {
            return fail("seen keys and sequences out of step");
        }
        for (index, key) in self.keys.iter().enumerate() {
            if self.keys[..index].contains(key) {
                return fail("duplicate key in the keyring");
            }
            if !self.seen.contains(key) {
                return fail("a keyring key is missing from the seen keys");
            }
        }
        Ok(())
    }

    pub fn hash_into(&self, hasher: &mut StateHasher) {
        hasher.section("keyring", self.keys.len());
        hasher.u64(self.version);
        for key in &self.keys {
            hasher.fixed(key);
        }
        hasher.section("admin_keys_seen", self.seen.len());
        for (key, last) in self.seen.iter().zip(&self.admin_seq_last) {
            hasher.fixed(key);
            hasher.u64(*last);
        }
    }
}

/// The first 8 bytes of a key as hex: enough to name it in messages.
pub fn key_prefix_hex(key: &PublicKey) -> String {
    crate::event::hex(&key[..8])
}
