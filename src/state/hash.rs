//! The 128-bit state commitment.
//!
//! Invariants: the hash is a pure function of the table columns in row order (rows
//! are in order of first appearance in the log), never of a hash map's iteration
//! order; every value is written little-endian with a fixed width, and every
//! variable-length value is length-prefixed, so distinct states cannot collide by
//! concatenation. Writes are buffered so that hashing 100k rows costs milliseconds.

const BUFFER_BYTES: usize = 1 << 16;

/// A buffered blake3 writer with fixed-width, length-prefixed encodings.
pub struct StateHasher {
    hasher: blake3::Hasher,
    buffer: Vec<u8>,
}

impl Default for StateHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl StateHasher {
    pub fn new() -> StateHasher {
        StateHasher { hasher: blake3::Hasher::new(), buffer: Vec::with_capacity(BUFFER_BYTES) }
    }

    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        if self.buffer.len() + bytes.len() > BUFFER_BYTES {
            self.hasher.update(&self.buffer);
            self.buffer.clear();
        }
        if bytes.len() > BUFFER_BYTES {
            self.hasher.update(bytes);
        } else {
            self.buffer.extend_from_slice(bytes);
        }
    }

    /// A section marker, so that columns cannot shift into each other.
    pub fn section(&mut self, name: &str, rows: usize) {
        self.str(name);
        self.u64(rows as u64);
    }

    #[inline]
    pub fn u8(&mut self, value: u8) {
        self.put(&[value]);
    }
    #[inline]
    pub fn bool(&mut self, value: bool) {
        self.put(&[value as u8]);
    }
    #[inline]
    pub fn u16(&mut self, value: u16) {
        self.put(&value.to_le_bytes());
    }
    #[inline]
    pub fn u32(&mut self, value: u32) {
        self.put(&value.to_le_bytes());
    }
    #[inline]
    pub fn i32(&mut self, value: i32) {
        self.put(&value.to_le_bytes());
    }
    #[inline]
    pub fn u64(&mut self, value: u64) {
        self.put(&value.to_le_bytes());
    }
    /// Fixed-size bytes (no length prefix).
    #[inline]
    pub fn fixed(&mut self, bytes: &[u8]) {
        self.put(bytes);
    }
    /// Variable-length bytes, length-prefixed.
    pub fn bytes(&mut self, bytes: &[u8]) {
        self.u64(bytes.len() as u64);
        self.put(bytes);
    }
    pub fn str(&mut self, text: &str) {
        self.bytes(text.as_bytes());
    }

    pub fn u32_column(&mut self, column: &[u32]) {
        for &value in column {
            self.u32(value);
        }
    }
    pub fn u64_column(&mut self, column: &[u64]) {
        for &value in column {
            self.u64(value);
        }
    }

    pub fn finish(mut self) -> u128 {
        self.hasher.update(&self.buffer);
        let digest = self.hasher.finalize();
        u128::from_le_bytes(digest.as_bytes()[..16].try_into().expect("16 bytes"))
    }
}

/// A state hash as 32 lowercase hex digits.
pub fn hash_hex(hash: u128) -> String {
    format!("{hash:032x}")
}
