//! An authenticated, encrypted channel between two MeshOS identities (nodes, or an
//! operator's admin tool towards a node), built on the Noise protocol (`snow`) and
//! ed25519 (`ed25519-dalek`); no cryptography is written here.
//!
//! # The handshake
//!
//! 1. Noise `NN` ([`NOISE_PARAMS`]: X25519, AES-256-GCM, BLAKE2s) with the
//!    prologue [`PROLOGUE`]: two messages, initiator `e`, responder `e, ee`. Both
//!    sides then hold transport keys and the same handshake hash `h` (32 bytes), which
//!    covers the prologue and both fresh ephemeral keys.
//! 2. The initiator sends its identity, encrypted: kind (node or operator), the
//!    cluster id, its ed25519 public key, an ed25519 signature and its node name. The
//!    signature covers [`SIGNATURE_DOMAIN`], the cluster id, `h`, the role (`I`), the
//!    kind, the key and the name ([`signed_bytes`]).
//! 3. The responder checks it (below). If it fails, the responder sends a one-byte
//!    refusal ([`Refusal`]) and fails; else it sends its own identity the same way
//!    (role `R`) and is established.
//! 4. The initiator checks that and is established. Only then do application
//!    messages flow (the first request goes with the next flight).
//!
//! The initiator speaks first so that a responder (a server) learns exactly why a
//! stranger failed, and signs nothing for one: a node's name and public key are no
//! secret, so the initiator's identity shown to an unchecked responder gives little
//! away, and its signature is bound to that one session.
//!
//! Identities are signed over the *final* Noise hash rather than carried in the
//! Noise payloads: `snow` exposes the hash only between messages, and the final hash
//! covers both ephemerals, so each signature binds the one session it was made in. A
//! recorded or relayed identity (made in another session) fails its signature; a
//! recorded frame fails to decrypt in any other session; a man in the middle who
//! replaces an ephemeral changes `h` on one side and fails both signatures.
//!
//! Checks, in order (each failure a typed [`SecureError`]): the message parses; the
//! cluster id is ours ([`SecureError::WrongCluster`]); a node's name is admitted
//! ([`PeerKeys::node_key`], else `UnknownNode`) with exactly this key (else
//! `KeyMismatch`); an operator key is accepted only by a responder that allows
//! operators and only if [`PeerKeys::is_operator_key`] says so; then the signature
//! (`verify_strict`, else `BadSignature`); an initiator that asked for a particular
//! node (`expect_peer`) refuses any other (`UnexpectedPeer`). The looked-up key is
//! compared before the (costlier) signature check.
//!
//! # Framing
//!
//! On the wire every Noise message is a frame: a u16 big-endian length and at most
//! 65535 bytes. An application message is a u32 big-endian length and its bytes,
//! split into Noise transport messages of at most 65519 plaintext bytes (65535 less
//! the 16-byte tag); a message of at most [`SINGLE_FRAME_MESSAGE_BYTES_MAX`] bytes
//! goes in one frame. Messages above the configured `message_bytes_max` are refused
//! on both sides ([`SecureError::MessageTooLarge`]).
//!
//! # Costs
//!
//! Handshake: per side one X25519 key generation and one Diffie-Hellman, one ed25519
//! signature and one ed25519 verification (tens of microseconds each on a current
//! core; the two ed25519 operations dominate), 4 frames (34 + 50 + 2 x ~150 bytes for
//! short names) and two round trips after the TCP connect before the first request
//! can go (Noise, identities). A stranger costs a responder one key generation, one
//! DH, one decryption and a key lookup, and a signature verification only if it names
//! an admitted node with that node's public key; servers still bound the connections
//! in their handshake (time and count). Per message: 4 bytes of length, and per 65519 bytes of
//! plaintext (one Noise message) 2 bytes of frame length and a 16-byte tag; a 64 KiB
//! message costs 38 bytes, under 0.06%.
//!
//! # Shapes
//!
//! [`Channel`] is the sans-I/O core (feed received bytes, take bytes to send, take
//! whole messages), usable from a readiness loop; [`SecureStream`] drives it over a
//! blocking `std::net::TcpStream` with a handshake deadline.
//!
//! Invariants: no application message is delivered or accepted for sending before
//! the peer's identity checked; nothing here
//! panics on peer input; buffered input is at most one frame (65537 bytes) beyond
//! what the caller fed in one call, a partial message at most `message_bytes_max`;
//! after an error the channel is dead (every further call fails) and `outgoing()`
//! holds at most a refusal the caller should still send; signing keys never appear in
//! `Debug` output.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

/// The Noise protocol every MeshOS channel speaks.
///
/// AES-256-GCM rather than ChaCha20-Poly1305: every server CPU MeshOS targets has AES
/// instructions, and `ring`'s AES-GCM (through snow's `ring-accelerated` resolver)
/// runs at about 8.8 GB/s per core here against 1.6 GB/s for the pure-Rust
/// ChaCha20-Poly1305 (`perf/ingest.md`), which made encryption a quarter of the
/// ingest path's CPU.
pub const NOISE_PARAMS: &str = "Noise_NN_25519_AESGCM_BLAKE2s";
/// Mixed into the Noise handshake hash: a MeshOS channel never completes with
/// another protocol that happens to use the same Noise pattern.
pub const PROLOGUE: &[u8] = b"meshos-secure-channel-v1";
/// The first bytes every identity signature covers.
pub const SIGNATURE_DOMAIN: &[u8] = b"meshos-secure-channel-identity-v1\0";
/// A cluster's id: 16 bytes, fixed at genesis.
pub type ClusterId = [u8; 16];
/// Longest node name an identity carries.
pub const NAME_BYTES_MAX: usize = 4096;
/// The most plaintext one Noise transport message holds (65535 less the tag).
const CHUNK_PLAINTEXT_BYTES_MAX: usize = NOISE_MESSAGE_BYTES_MAX - TAG_BYTES;
const NOISE_MESSAGE_BYTES_MAX: usize = 65_535;
const TAG_BYTES: usize = 16;
const FRAME_HEADER_BYTES: usize = 2;
const LENGTH_PREFIX_BYTES: usize = 4;
/// The largest application message that travels in a single frame.
pub const SINGLE_FRAME_MESSAGE_BYTES_MAX: usize = CHUNK_PLAINTEXT_BYTES_MAX - LENGTH_PREFIX_BYTES;
/// Bytes a frame adds to its plaintext (length and tag).
pub const FRAME_OVERHEAD_BYTES: usize = FRAME_HEADER_BYTES + TAG_BYTES;
/// The longest frame on the wire (length and a whole Noise message).
pub const FRAME_BYTES_MAX: usize = FRAME_HEADER_BYTES + NOISE_MESSAGE_BYTES_MAX;
/// The longest frame of a handshake: an identity with the longest name.
pub const HANDSHAKE_FRAME_BYTES_MAX: usize = FRAME_HEADER_BYTES + IDENTITY_FIXED_BYTES + NAME_BYTES_MAX + TAG_BYTES;
/// What this side writes in a Noise handshake message at most (an ephemeral key,
/// and for the responder a tag).
const HANDSHAKE_WRITE_BYTES_MAX: usize = 256;

const KIND_NODE: u8 = 1;
const KIND_OPERATOR: u8 = 2;
const ROLE_INITIATOR: u8 = b'I';
const ROLE_RESPONDER: u8 = b'R';
/// kind, cluster id, key, signature; the name follows.
const IDENTITY_FIXED_BYTES: usize = 1 + 16 + 32 + 64;

/// The admitted keys a channel checks identities against. The node implements it over
/// the folded state (admitted node keys by name, operator keys); [`StaticPeerKeys`]
/// is a fixed table for tests and tools.
pub trait PeerKeys: Send + Sync {
    /// The ed25519 public key admitted for the node `name`, if any.
    fn node_key(&self, name: &str) -> Option<[u8; 32]>;
    /// Whether `key` is an operator's key (only asked by responders that accept
    /// operators). None by default.
    fn is_operator_key(&self, _key: &[u8; 32]) -> bool {
        false
    }
}

/// A fixed table of keys: nodes by name, and operator keys.
#[derive(Debug, Clone, Default)]
pub struct StaticPeerKeys {
    pub nodes: std::collections::HashMap<String, [u8; 32]>,
    pub operators: Vec<[u8; 32]>,
}

impl StaticPeerKeys {
    /// A table of these nodes' keys.
    pub fn of_nodes<'a>(nodes: impl IntoIterator<Item = (&'a str, [u8; 32])>) -> StaticPeerKeys {
        StaticPeerKeys {
            nodes: nodes.into_iter().map(|(name, key)| (name.to_string(), key)).collect(),
            operators: Vec::new(),
        }
    }
}

impl PeerKeys for StaticPeerKeys {
    fn node_key(&self, name: &str) -> Option<[u8; 32]> {
        self.nodes.get(name).copied()
    }

    fn is_operator_key(&self, key: &[u8; 32]) -> bool {
        self.operators.contains(key)
    }
}

/// Who the other end proved to be.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// An admitted node, by name.
    Node(String),
    /// An operator, by ed25519 public key.
    Operator([u8; 32]),
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Node(name) => write!(f, "node {name:?}"),
            Identity::Operator(key) => write!(f, "operator {}", crate::event::hex(key)),
        }
    }
}

/// Who this side is, with the key that proves it.
#[derive(Clone)]
pub enum LocalIdentity {
    Node { name: String, key: SigningKey },
    Operator { key: SigningKey },
}

impl LocalIdentity {
    /// The node `name`, proving it with `key`.
    pub fn node(name: &str, key: &crate::trust::KeyPair) -> LocalIdentity {
        LocalIdentity::Node { name: name.to_string(), key: key.signing_key().clone() }
    }

    /// An operator, by its key.
    pub fn operator(key: &crate::trust::KeyPair) -> LocalIdentity {
        LocalIdentity::Operator { key: key.signing_key().clone() }
    }

    fn signing_key(&self) -> &SigningKey {
        match self {
            LocalIdentity::Node { key, .. } | LocalIdentity::Operator { key } => key,
        }
    }

    /// The identity the other end will see.
    pub fn identity(&self) -> Identity {
        match self {
            LocalIdentity::Node { name, .. } => Identity::Node(name.clone()),
            LocalIdentity::Operator { key } => Identity::Operator(key.verifying_key().to_bytes()),
        }
    }
}

impl std::fmt::Debug for LocalIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The public key only: the signing key never appears.
        write!(f, "{} (key {})", self.identity(), crate::event::hex(&self.signing_key().verifying_key().to_bytes()))
    }
}

/// What a channel needs: the cluster, who this side is, whom it admits, and the
/// largest message.
#[derive(Clone)]
pub struct SecureConfig {
    pub cluster_id: ClusterId,
    pub local: LocalIdentity,
    pub keys: Arc<dyn PeerKeys>,
    /// As a responder, accept operator identities ([`PeerKeys::is_operator_key`]).
    pub accept_operators: bool,
    /// The largest application message sent or received.
    pub message_bytes_max: u32,
}

impl SecureConfig {
    /// A client's config that knows one node, `server` with its public key
    /// `server_key` (the ingest port's clients: load generators, tools, tests).
    pub fn towards_node(
        cluster_id: ClusterId,
        local: LocalIdentity,
        server: &str,
        server_key: [u8; 32],
    ) -> Arc<SecureConfig> {
        Arc::new(SecureConfig {
            cluster_id,
            local,
            keys: Arc::new(StaticPeerKeys::of_nodes([(server, server_key)])),
            accept_operators: false,
            message_bytes_max: SINGLE_FRAME_MESSAGE_BYTES_MAX as u32,
        })
    }
}

impl std::fmt::Debug for SecureConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureConfig")
            .field("cluster_id", &crate::event::hex(&self.cluster_id))
            .field("local", &self.local)
            .field("accept_operators", &self.accept_operators)
            .field("message_bytes_max", &self.message_bytes_max)
            .finish_non_exhaustive()
    }
}

/// Why a responder refused an initiator (sent to it as one byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    WrongCluster,
    UnknownNode,
    KeyMismatch,
    BadSignature,
    Operator,
    Malformed,
}

impl Refusal {
    fn code(self) -> u8 {
        match self {
            Refusal::WrongCluster => 1,
            Refusal::UnknownNode => 2,
            Refusal::KeyMismatch => 3,
            Refusal::BadSignature => 4,
            Refusal::Operator => 5,
            Refusal::Malformed => 6,
        }
    }

    fn from_code(code: u8) -> Option<Refusal> {
        Some(match code {
            1 => Refusal::WrongCluster,
            2 => Refusal::UnknownNode,
            3 => Refusal::KeyMismatch,
            4 => Refusal::BadSignature,
            5 => Refusal::Operator,
            6 => Refusal::Malformed,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::WrongCluster => "wrong cluster",
            Refusal::UnknownNode => "unknown node (no admitted key by that name)",
            Refusal::KeyMismatch => "key mismatch (not the node's admitted key)",
            Refusal::BadSignature => "bad identity signature",
            Refusal::Operator => "operator identity not accepted",
            Refusal::Malformed => "malformed identity",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    /// The Noise handshake or an identity message did not parse or decrypt, or the
    /// connection closed before the handshake finished.
    #[error("bad handshake: {0}")]
    BadHandshake(String),
    #[error("wrong cluster: the peer is of cluster {got}, this side of {expected}")]
    WrongCluster { expected: String, got: String },
    #[error("unknown node {name:?}: no admitted key by that name")]
    UnknownNode { name: String },
    #[error("key mismatch: node {name:?} presented a key that is not its admitted key")]
    KeyMismatch { name: String },
    #[error("operator identity not accepted here")]
    OperatorNotAccepted,
    #[error("unknown operator key {key}")]
    UnknownOperator { key: String },
    #[error("bad signature: the identity of {identity} is not signed for this session")]
    BadSignature { identity: String },
    #[error("unexpected peer: expected node {expected:?}, the peer is {got}")]
    UnexpectedPeer { expected: String, got: String },
    #[error("refused by the peer: {0}")]
    Refused(Refusal),
    #[error("handshake deadline of {deadline_ms} ms passed")]
    Deadline { deadline_ms: u64 },
    #[error("message of {bytes} bytes is over the limit of {max} bytes")]
    MessageTooLarge { bytes: u64, max: u32 },
    /// A frame after the handshake did not decrypt, or broke the message framing.
    #[error("bad message: {0}")]
    BadMessage(String),
    #[error("the channel cannot send yet (handshake not finished)")]
    NotEstablished,
    /// The channel failed earlier; it stays dead.
    #[error("the channel failed earlier: {0}")]
    Failed(String),
    #[error("connection closed in the middle of a message")]
    Truncated,
    #[error("secure channel setup: {0}")]
    Setup(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl SecureError {
    /// True when the other end is not who it must be, or refused who this side is:
    /// a credential problem rather than a transport one.
    pub fn is_authentication(&self) -> bool {
        matches!(
            self,
            SecureError::WrongCluster { .. }
                | SecureError::UnknownNode { .. }
                | SecureError::KeyMismatch { .. }
                | SecureError::OperatorNotAccepted
                | SecureError::UnknownOperator { .. }
                | SecureError::BadSignature { .. }
                | SecureError::UnexpectedPeer { .. }
                | SecureError::Refused(_)
        )
    }

    /// The verdict a responder sends for this failure of the initiator's identity.
    fn refusal(&self) -> Refusal {
        match self {
            SecureError::WrongCluster { .. } => Refusal::WrongCluster,
            SecureError::UnknownNode { .. } => Refusal::UnknownNode,
            SecureError::KeyMismatch { .. } => Refusal::KeyMismatch,
            SecureError::BadSignature { .. } => Refusal::BadSignature,
            SecureError::OperatorNotAccepted | SecureError::UnknownOperator { .. } => Refusal::Operator,
            _ => Refusal::Malformed,
        }
    }
}

/// Which end of the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Initiator,
    Responder,
}

enum Phase {
    /// The Noise handshake is under way.
    Noise(Box<snow::HandshakeState>),
    /// Noise is done; the peer's identity (or, for an initiator, a refusal) is awaited.
    AwaitIdentity,
    Established,
    Failed(String),
}

/// The sans-I/O channel: [`receive`](Channel::receive) what came in, send
/// [`outgoing`](Channel::outgoing) bytes, take [`next_message`](Channel::next_message).
pub struct Channel {
    config: Arc<SecureConfig>,
    role: Role,
    expect_peer: Option<String>,
    phase: Phase,
    transport: Option<Arc<snow::StatelessTransportState>>,
    /// The nonce of the next transport message sent, and of the next one received.
    send_nonce: u64,
    receive_nonce: u64,
    /// Stream mode ([`Channel::for_stream`]): `receive` stops at the end of the
    /// handshake and leaves later bytes unread, for [`Channel::into_stream`].
    stream: bool,
    handshake_hash: [u8; 32],
    peer: Option<Identity>,
    inbox: Vec<u8>,
    outbox: Vec<u8>,
    messages: VecDeque<Vec<u8>>,
    /// A message whose first chunks arrived: its total length and its bytes so far.
    partial: Option<(usize, Vec<u8>)>,
    scratch: Vec<u8>,
    /// Sent instead of this side's identity (tests of replayed identities).
    #[cfg(test)]
    identity_override: Option<Vec<u8>>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("role", &self.role)
            .field("established", &self.is_established())
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

fn noise(role: Role) -> Result<snow::HandshakeState, SecureError> {
    let setup = |error: snow::Error| SecureError::Setup(error.to_string());
    let params: snow::params::NoiseParams = NOISE_PARAMS.parse().map_err(setup)?;
    let builder = snow::Builder::new(params).prologue(PROLOGUE).map_err(setup)?;
    match role {
        Role::Initiator => builder.build_initiator(),
        Role::Responder => builder.build_responder(),
    }
    .map_err(setup)
}

/// The bytes an identity signature covers: the domain, the cluster id, the session's
/// handshake hash, the signer's role, its kind, its key and its name (length-prefixed).
pub fn signed_bytes(
    cluster_id: &ClusterId,
    handshake_hash: &[u8; 32],
    role: Role,
    kind: u8,
    key: &[u8; 32],
    name: &[u8],
) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(SIGNATURE_DOMAIN.len() + 16 + 32 + 2 + 32 + 4 + name.len());
    bytes.extend_from_slice(SIGNATURE_DOMAIN);
    bytes.extend_from_slice(cluster_id);
    bytes.extend_from_slice(handshake_hash);
    bytes.push(match role {
        Role::Initiator => ROLE_INITIATOR,
        Role::Responder => ROLE_RESPONDER,
    });
    bytes.push(kind);
    bytes.extend_from_slice(key);
    bytes.extend_from_slice(&(name.len() as u32).to_be_bytes());
    bytes.extend_from_slice(name);
    bytes
}

/// This side's identity message for the session with hash `handshake_hash`.
fn identity_message(config: &SecureConfig, handshake_hash: &[u8; 32], role: Role) -> Vec<u8> {
    let signing_key = config.local.signing_key();
    let key = signing_key.verifying_key().to_bytes();
    let (kind, name): (u8, &[u8]) = match &config.local {
        LocalIdentity::Node { name, .. } => (KIND_NODE, name.as_bytes()),
        LocalIdentity::Operator { .. } => (KIND_OPERATOR, &[]),
    };
    let signature = signing_key.sign(&signed_bytes(&config.cluster_id, handshake_hash, role, kind, &key, name));
    let mut message = Vec::with_capacity(IDENTITY_FIXED_BYTES + name.len());
    message.push(kind);
    message.extend_from_slice(&config.cluster_id);
    message.extend_from_slice(&key);
    message.extend_from_slice(&signature.to_bytes());
    message.extend_from_slice(name);
    message
}

impl Channel {
    /// The connecting side; its first frame is queued at once. `expect_peer`: the node
    /// it means to reach (any admitted node when None).
    pub fn initiator(config: Arc<SecureConfig>, expect_peer: Option<&str>) -> Result<Channel, SecureError> {
        let mut channel = Channel::new(config, Role::Initiator, expect_peer)?;
        let Phase::Noise(handshake) = &mut channel.phase else { unreachable!("a new channel is in its handshake") };
        let mut frame = vec![0u8; HANDSHAKE_WRITE_BYTES_MAX];
        let written =
            handshake.write_message(&[], &mut frame).map_err(|error| SecureError::Setup(error.to_string()))?;
        push_frame(&mut channel.outbox, &frame[..written]);
        Ok(channel)
    }

    /// The accepting side: waits for the initiator's first frame.
    pub fn responder(config: Arc<SecureConfig>) -> Result<Channel, SecureError> {
        Channel::new(config, Role::Responder, None)
    }

    /// Stream mode: after the handshake the two ends exchange a byte stream of their
    /// own framing (the ingest port's wire frames), each direction cut into Noise
    /// transport messages of any size, with no message layer. `receive` stops at the
    /// end of the handshake and leaves the bytes after it unread; then
    /// [`into_stream`](Channel::into_stream) gives the two directions apart.
    pub fn for_stream(mut self) -> Channel {
        self.stream = true;
        self
    }

    /// The established stream-mode channel as its two directions, the peer's
    /// identity, the bytes received after the handshake (ciphertext for the
    /// [`StreamReceiver`]) and the bytes still to send (the responder's identity).
    pub fn into_stream(self) -> Result<StreamParts, SecureError> {
        if !self.stream {
            return Err(SecureError::Setup("into_stream on a channel not in stream mode".to_string()));
        }
        if let Phase::Failed(reason) = &self.phase {
            return Err(SecureError::Failed(reason.clone()));
        }
        let (Some(transport), Some(peer), true) = (self.transport, self.peer, matches!(self.phase, Phase::Established))
        else {
            return Err(SecureError::NotEstablished);
        };
        assert!(self.messages.is_empty() && self.partial.is_none(), "a stream-mode channel has no message layer");
        Ok(StreamParts {
            sender: StreamSender { transport: Arc::clone(&transport), nonce: self.send_nonce },
            receiver: StreamReceiver { transport, nonce: self.receive_nonce },
            peer,
            received: self.inbox,
            outgoing: self.outbox,
        })
    }

    fn new(config: Arc<SecureConfig>, role: Role, expect_peer: Option<&str>) -> Result<Channel, SecureError> {
        if let LocalIdentity::Node { name, .. } = &config.local {
            if name.is_empty() || name.len() > NAME_BYTES_MAX {
                return Err(SecureError::Setup(format!("node name of {} bytes (1..={NAME_BYTES_MAX})", name.len())));
            }
        }
        if (config.message_bytes_max as u64) < SINGLE_FRAME_MESSAGE_BYTES_MAX as u64 / 64 {
            return Err(SecureError::Setup(format!("message_bytes_max {} is too small", config.message_bytes_max)));
        }
        Ok(Channel {
            config,
            role,
            expect_peer: expect_peer.map(str::to_string),
            phase: Phase::Noise(Box::new(noise(role)?)),
            transport: None,
            send_nonce: 0,
            receive_nonce: 0,
            stream: false,
            handshake_hash: [0; 32],
            peer: None,
            inbox: Vec::new(),
            outbox: Vec::new(),
            messages: VecDeque::new(),
            partial: None,
            // Grows to what a frame needs: a handshake costs a few hundred bytes, not
            // a whole Noise message.
            scratch: Vec::new(),
            #[cfg(test)]
            identity_override: None,
        })
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// Both identities checked: messages flow both ways.
    pub fn is_established(&self) -> bool {
        matches!(self.phase, Phase::Established)
    }

    /// The channel failed (every further call fails).
    pub fn is_failed(&self) -> bool {
        matches!(self.phase, Phase::Failed(_))
    }

    /// The other end's identity, once checked.
    pub fn peer(&self) -> Option<&Identity> {
        self.peer.as_ref()
    }

    /// The Noise handshake hash, once the Noise handshake finished (the same on both
    /// sides of one session, different in every other).
    pub fn handshake_hash(&self) -> Option<[u8; 32]> {
        self.transport.as_ref().map(|_| self.handshake_hash)
    }

    /// Bytes waiting to be sent.
    pub fn outgoing(&self) -> &[u8] {
        &self.outbox
    }

    /// Drops the first `bytes` of [`outgoing`](Channel::outgoing) (they were sent).
    pub fn consume_outgoing(&mut self, bytes: usize) {
        self.outbox.drain(..bytes.min(self.outbox.len()));
    }

    /// Takes every byte waiting to be sent.
    pub fn take_outgoing(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.outbox)
    }

    /// The next whole message received, if any.
    pub fn next_message(&mut self) -> Option<Vec<u8>> {
        self.messages.pop_front()
    }

    /// Whether a message is partly received (a close now would cut it).
    pub fn in_message(&self) -> bool {
        self.partial.is_some() || !self.inbox.is_empty()
    }

    /// Feeds received bytes: advances the handshake, queues answers in `outgoing`,
    /// whole messages for `next_message`. An error is final.
    pub fn receive(&mut self, bytes: &[u8]) -> Result<(), SecureError> {
        if let Phase::Failed(reason) = &self.phase {
            return Err(SecureError::Failed(reason.clone()));
        }
        self.inbox.extend_from_slice(bytes);
        let inbox = std::mem::take(&mut self.inbox);
        let mut at = 0;
        let mut result = Ok(());
        while inbox.len() - at >= FRAME_HEADER_BYTES && !(self.stream && self.is_established()) {
            let length = u16::from_be_bytes([inbox[at], inbox[at + 1]]) as usize;
            let end = at + FRAME_HEADER_BYTES + length;
            if inbox.len() < end {
                break;
            }
            result = self.on_frame(&inbox[at + FRAME_HEADER_BYTES..end]);
            at = end;
            if result.is_err() {
                break;
            }
        }
        match result {
            Ok(()) => {
                self.inbox = inbox;
                self.inbox.drain(..at);
                Ok(())
            }
            Err(error) => {
                self.phase = Phase::Failed(error.to_string());
                self.messages.clear();
                self.partial = None;
                Err(error)
            }
        }
    }

    /// Queues `message` (encrypted, chunked) in `outgoing`.
    pub fn send(&mut self, message: &[u8]) -> Result<(), SecureError> {
        if let Phase::Failed(reason) = &self.phase {
            return Err(SecureError::Failed(reason.clone()));
        }
        if !self.is_established() {
            return Err(SecureError::NotEstablished);
        }
        if message.len() as u64 > self.config.message_bytes_max as u64 {
            return Err(SecureError::MessageTooLarge {
                bytes: message.len() as u64,
                max: self.config.message_bytes_max,
            });
        }
        let mut chunk = Vec::with_capacity(CHUNK_PLAINTEXT_BYTES_MAX.min(LENGTH_PREFIX_BYTES + message.len()));
        chunk.extend_from_slice(&(message.len() as u32).to_be_bytes());
        let first = message.len().min(SINGLE_FRAME_MESSAGE_BYTES_MAX);
        chunk.extend_from_slice(&message[..first]);
        self.encrypt(&chunk)?;
        for rest in message[first..].chunks(CHUNK_PLAINTEXT_BYTES_MAX) {
            self.encrypt(rest)?;
        }
        Ok(())
    }

    /// Encrypts one chunk into a frame at the end of `outbox`.
    fn encrypt(&mut self, plaintext: &[u8]) -> Result<(), SecureError> {
        let transport = self.transport.as_ref().ok_or(SecureError::NotEstablished)?;
        seal_frame(transport, &mut self.send_nonce, plaintext, &mut self.outbox)
    }

    /// Decrypts one frame into `scratch`; its plaintext length.
    fn decrypt(&mut self, frame: &[u8]) -> Result<usize, String> {
        let transport = self.transport.as_ref().ok_or("no transport keys")?;
        if self.scratch.len() < frame.len() {
            self.scratch.resize(frame.len(), 0);
        }
        let read = transport
            .read_message(self.receive_nonce, frame, &mut self.scratch)
            .map_err(|error| format!("a frame did not decrypt: {error}"))?;
        self.receive_nonce = next_nonce(self.receive_nonce).map_err(|error| error.to_string())?;
        Ok(read)
    }

    fn on_frame(&mut self, frame: &[u8]) -> Result<(), SecureError> {
        match std::mem::replace(&mut self.phase, Phase::Failed("interrupted".to_string())) {
            Phase::Noise(mut handshake) => {
                // The output of a handshake message is at most its input, and what this
                // side writes (an ephemeral key) is 32 bytes.
                let wanted = frame.len().max(HANDSHAKE_WRITE_BYTES_MAX);
                if self.scratch.len() < wanted {
                    self.scratch.resize(wanted, 0);
                }
                let read = handshake
                    .read_message(frame, &mut self.scratch)
                    .map_err(|error| SecureError::BadHandshake(format!("Noise message: {error}")))?;
                if read != 0 {
                    return Err(SecureError::BadHandshake("a Noise message carried a payload".to_string()));
                }
                if !handshake.is_handshake_finished() && handshake.is_my_turn() {
                    let written = handshake
                        .write_message(&[], &mut self.scratch)
                        .map_err(|error| SecureError::BadHandshake(format!("Noise message: {error}")))?;
                    push_frame(&mut self.outbox, &self.scratch[..written]);
                }
                if !handshake.is_handshake_finished() {
                    self.phase = Phase::Noise(handshake);
                    return Ok(());
                }
                let hash = handshake.get_handshake_hash();
                self.handshake_hash = hash
                    .try_into()
                    .map_err(|_| SecureError::Setup(format!("a handshake hash of {} bytes", hash.len())))?;
                self.transport = Some(Arc::new(
                    handshake
                        .into_stateless_transport_mode()
                        .map_err(|error| SecureError::BadHandshake(format!("Noise: {error}")))?,
                ));
                if self.role == Role::Initiator {
                    self.send_identity()?;
                }
                self.phase = Phase::AwaitIdentity;
                Ok(())
            }
            Phase::AwaitIdentity => {
                let read =
                    self.decrypt(frame).map_err(|reason| SecureError::BadHandshake(format!("identity: {reason}")))?;
                let message = self.scratch[..read].to_vec();
                let checked = match (self.role, message.as_slice()) {
                    (Role::Initiator, &[code]) => Err(Refusal::from_code(code).map_or_else(
                        || SecureError::BadHandshake(format!("unknown refusal {code}")),
                        SecureError::Refused,
                    )),
                    (Role::Initiator, _) => self.check_identity(&message, Role::Responder),
                    (Role::Responder, _) => self.check_identity(&message, Role::Initiator),
                };
                match checked {
                    Ok(identity) => self.peer = Some(identity),
                    Err(error) => {
                        if self.role == Role::Responder {
                            // Tell the initiator why, then fail.
                            let _ = self.encrypt(&[error.refusal().code()]);
                        }
                        return Err(error);
                    }
                }
                if self.role == Role::Responder {
                    self.send_identity()?;
                }
                self.phase = Phase::Established;
                Ok(())
            }
            Phase::Established => {
                self.phase = Phase::Established;
                let read = self.decrypt(frame).map_err(SecureError::BadMessage)?;
                self.on_chunk(read)
            }
            Phase::Failed(reason) => Err(SecureError::Failed(reason)),
        }
    }

    /// Sends this side's identity for this session.
    fn send_identity(&mut self) -> Result<(), SecureError> {
        #[cfg(test)]
        if let Some(replayed) = self.identity_override.take() {
            return self.encrypt(&replayed);
        }
        let identity = identity_message(&self.config, &self.handshake_hash, self.role);
        self.encrypt(&identity)
    }

    /// One decrypted chunk (in `scratch[..read]`) of an application message.
    fn on_chunk(&mut self, read: usize) -> Result<(), SecureError> {
        let chunk = &self.scratch[..read];
        match &mut self.partial {
            None => {
                let Some((prefix, body)) = chunk.split_first_chunk::<LENGTH_PREFIX_BYTES>() else {
                    return Err(SecureError::BadMessage(format!("a first chunk of {read} bytes")));
                };
                let total = u32::from_be_bytes(*prefix) as u64;
                if total > self.config.message_bytes_max as u64 {
                    return Err(SecureError::MessageTooLarge { bytes: total, max: self.config.message_bytes_max });
                }
                let total = total as usize;
                if body.len() > total {
                    return Err(SecureError::BadMessage("a chunk longer than its message".to_string()));
                }
                if body.len() == total {
                    self.messages.push_back(body.to_vec());
                } else {
                    // Grows as bytes arrive: a claimed size reserves nothing.
                    let mut bytes = Vec::with_capacity(body.len().max(CHUNK_PLAINTEXT_BYTES_MAX));
                    bytes.extend_from_slice(body);
                    self.partial = Some((total, bytes));
                }
            }
            Some((total, bytes)) => {
                if chunk.is_empty() || bytes.len() + chunk.len() > *total {
                    return Err(SecureError::BadMessage("a chunk empty or past its message's end".to_string()));
                }
                bytes.extend_from_slice(chunk);
                if bytes.len() == *total {
                    let (_, bytes) = self.partial.take().expect("matched Some");
                    self.messages.push_back(bytes);
                }
            }
        }
        Ok(())
    }

    /// Checks an identity message from the peer in `peer_role`.
    fn check_identity(&self, message: &[u8], peer_role: Role) -> Result<Identity, SecureError> {
        let malformed = |what: &str| SecureError::BadHandshake(format!("identity message: {what}"));
        if message.len() < IDENTITY_FIXED_BYTES || message.len() > IDENTITY_FIXED_BYTES + NAME_BYTES_MAX {
            return Err(malformed("wrong length"));
        }
        let kind = message[0];
        let cluster_id: ClusterId = message[1..17].try_into().map_err(|_| malformed("cluster id"))?;
        let key: [u8; 32] = message[17..49].try_into().map_err(|_| malformed("key"))?;
        let signature: [u8; 64] = message[49..113].try_into().map_err(|_| malformed("signature"))?;
        let name = &message[IDENTITY_FIXED_BYTES..];
        if cluster_id != self.config.cluster_id {
            return Err(SecureError::WrongCluster {
                expected: crate::event::hex(&self.config.cluster_id),
                got: crate::event::hex(&cluster_id),
            });
        }
        let identity = match kind {
            KIND_NODE => {
                let name = std::str::from_utf8(name).map_err(|_| malformed("a name that is not UTF-8"))?;
                if name.is_empty() {
                    return Err(malformed("an empty name"));
                }
                match self.config.keys.node_key(name) {
                    None => return Err(SecureError::UnknownNode { name: shown(name) }),
                    Some(admitted) if admitted != key => return Err(SecureError::KeyMismatch { name: shown(name) }),
                    Some(_) => Identity::Node(name.to_string()),
                }
            }
            KIND_OPERATOR => {
                if !name.is_empty() {
                    return Err(malformed("an operator with a name"));
                }
                if peer_role != Role::Initiator || !self.config.accept_operators {
                    return Err(SecureError::OperatorNotAccepted);
                }
                if !self.config.keys.is_operator_key(&key) {
                    return Err(SecureError::UnknownOperator { key: crate::event::hex(&key) });
                }
                Identity::Operator(key)
            }
            other => return Err(malformed(&format!("unknown kind {other}"))),
        };
        let bad_signature = || SecureError::BadSignature { identity: identity.to_string() };
        let verifying = VerifyingKey::from_bytes(&key).map_err(|_| bad_signature())?;
        let signed = signed_bytes(&cluster_id, &self.handshake_hash, peer_role, kind, &key, name);
        verifying.verify_strict(&signed, &Signature::from_bytes(&signature)).map_err(|_| bad_signature())?;
        if let Some(expected) = &self.expect_peer {
            if identity != Identity::Node(expected.clone()) {
                return Err(SecureError::UnexpectedPeer { expected: expected.clone(), got: identity.to_string() });
            }
        }
        Ok(identity)
    }
}

/// A name from a peer as it may appear in errors and logs: at most 64 characters.
fn shown(name: &str) -> String {
    name.chars().take(64).collect()
}

/// The nonce after `nonce`; Noise forbids reaching `u64::MAX` (2^64 - 1 messages on
/// one channel: never in practice, but never wrapped either).
fn next_nonce(nonce: u64) -> Result<u64, SecureError> {
    match nonce.checked_add(1) {
        Some(next) if next < u64::MAX => Ok(next),
        _ => Err(SecureError::BadMessage("the channel's nonces are exhausted".to_string())),
    }
}

/// Encrypts `plaintext` (at most one Noise message's worth) as one frame at the end of
/// `out`, with the nonce `nonce`, which then advances.
fn seal_frame(
    transport: &snow::StatelessTransportState,
    nonce: &mut u64,
    plaintext: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), SecureError> {
    let at = out.len();
    out.resize(at + FRAME_HEADER_BYTES + plaintext.len() + TAG_BYTES, 0);
    match transport.write_message(*nonce, plaintext, &mut out[at + FRAME_HEADER_BYTES..]) {
        Ok(written) => {
            out[at..at + FRAME_HEADER_BYTES].copy_from_slice(&(written as u16).to_be_bytes());
            out.truncate(at + FRAME_HEADER_BYTES + written);
            *nonce = next_nonce(*nonce)?;
            Ok(())
        }
        Err(error) => {
            out.truncate(at);
            Err(SecureError::BadMessage(format!("cannot encrypt: {error}")))
        }
    }
}

/// A stream-mode channel taken apart ([`Channel::into_stream`]).
pub struct StreamParts {
    pub sender: StreamSender,
    pub receiver: StreamReceiver,
    pub peer: Identity,
    /// Ciphertext received after the handshake, for `receiver`.
    pub received: Vec<u8>,
    /// Bytes still to send before anything `sender` seals.
    pub outgoing: Vec<u8>,
}

/// The sending direction of a stream-mode channel: plaintext bytes in, frames out.
pub struct StreamSender {
    transport: Arc<snow::StatelessTransportState>,
    nonce: u64,
}

impl std::fmt::Debug for StreamSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSender").field("nonce", &self.nonce).finish_non_exhaustive()
    }
}

impl StreamSender {
    /// Appends `plaintext` to `out` encrypted, as frames of at most 65519 plaintext
    /// bytes each (18 bytes of overhead per frame).
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), SecureError> {
        out.reserve(
            plaintext.len() + plaintext.len().div_ceil(CHUNK_PLAINTEXT_BYTES_MAX).max(1) * FRAME_OVERHEAD_BYTES,
        );
        for chunk in plaintext.chunks(CHUNK_PLAINTEXT_BYTES_MAX) {
            seal_frame(&self.transport, &mut self.nonce, chunk, out)?;
        }
        Ok(())
    }

    /// Bytes `seal` adds to `plaintext_bytes` of plaintext.
    pub fn sealed_bytes(plaintext_bytes: usize) -> usize {
        plaintext_bytes + plaintext_bytes.div_ceil(CHUNK_PLAINTEXT_BYTES_MAX) * FRAME_OVERHEAD_BYTES
    }
}

/// The receiving direction of a stream-mode channel: frames in, plaintext out, in
/// place.
pub struct StreamReceiver {
    transport: Arc<snow::StatelessTransportState>,
    nonce: u64,
}

impl std::fmt::Debug for StreamReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReceiver").field("nonce", &self.nonce).finish_non_exhaustive()
    }
}

impl StreamReceiver {
    /// Decrypts, in place, every whole frame in `buffer[plain_end..]`:
    /// `buffer[..plain_end]` is plaintext already, the rest ciphertext as received.
    /// Each frame's plaintext is written right after the plaintext before it (it is
    /// shorter than its frame, so it never overtakes the ciphertext still to read);
    /// the partial frame left, if any, moves up behind it. Returns the new plaintext
    /// end. `scratch` holds one frame's ciphertext (at least 65535 bytes). An error
    /// (a frame that does not decrypt: tampered, replayed, reordered or of another
    /// session) is final.
    pub fn open_in_place(
        &mut self,
        buffer: &mut Vec<u8>,
        plain_end: usize,
        scratch: &mut [u8],
    ) -> Result<usize, SecureError> {
        assert!(plain_end <= buffer.len(), "plaintext end {plain_end} past the buffer of {}", buffer.len());
        assert!(scratch.len() >= NOISE_MESSAGE_BYTES_MAX, "scratch of {} bytes", scratch.len());
        let mut read = plain_end;
        let mut write = plain_end;
        while buffer.len() - read >= FRAME_HEADER_BYTES {
            let length = u16::from_be_bytes([buffer[read], buffer[read + 1]]) as usize;
            if length < TAG_BYTES {
                return Err(SecureError::BadMessage(format!("a frame of {length} bytes, shorter than its tag")));
            }
            let end = read + FRAME_HEADER_BYTES + length;
            if end > buffer.len() {
                break;
            }
            scratch[..length].copy_from_slice(&buffer[read + FRAME_HEADER_BYTES..end]);
            let plaintext = length - TAG_BYTES;
            let opened = self
                .transport
                .read_message(self.nonce, &scratch[..length], &mut buffer[write..write + plaintext])
                .map_err(|error| SecureError::BadMessage(format!("a frame did not decrypt: {error}")))?;
            debug_assert_eq!(opened, plaintext);
            self.nonce = next_nonce(self.nonce)?;
            write += opened;
            read = end;
        }
        if read > write {
            buffer.copy_within(read.., write);
            buffer.truncate(buffer.len() - (read - write));
        }
        Ok(write)
    }
}

fn push_frame(outbox: &mut Vec<u8>, message: &[u8]) {
    outbox.extend_from_slice(&(message.len() as u16).to_be_bytes());
    outbox.extend_from_slice(message);
}

/// Bytes read from the socket at a time.
const READ_BYTES: usize = 16 * 1024;

/// A [`Channel`] over a blocking TCP stream.
pub struct SecureStream {
    stream: TcpStream,
    channel: Channel,
    buffer: Vec<u8>,
    closed: bool,
}

impl std::fmt::Debug for SecureStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureStream")
            .field("peer_addr", &self.stream.peer_addr().ok())
            .field("channel", &self.channel)
            .finish()
    }
}

impl SecureStream {
    /// Connects to `addr` and completes the handshake as the initiator, all within
    /// `timeout`; afterwards every read and write has `timeout`.
    pub fn connect(
        addr: SocketAddr,
        config: Arc<SecureConfig>,
        expect_peer: Option<&str>,
        timeout: Duration,
    ) -> Result<SecureStream, SecureError> {
        let deadline = Instant::now() + timeout;
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_nodelay(true)?;
        let stream = SecureStream::handshake(stream, Channel::initiator(config, expect_peer)?, deadline)?;
        stream.set_io_timeout(timeout)?;
        Ok(stream)
    }

    /// Completes the handshake as the responder on an accepted stream, by `deadline`
    /// (then [`SecureError::Deadline`]). A refusal is sent before the error returns.
    /// The caller sets the io timeout after.
    pub fn accept(
        stream: TcpStream,
        config: Arc<SecureConfig>,
        deadline: Instant,
    ) -> Result<SecureStream, SecureError> {
        SecureStream::handshake(stream, Channel::responder(config)?, deadline)
    }

    /// Drives `channel` over `stream` until established, failed, or `deadline`.
    pub fn handshake(stream: TcpStream, channel: Channel, deadline: Instant) -> Result<SecureStream, SecureError> {
        let started = Instant::now();
        let deadline_passed =
            || SecureError::Deadline { deadline_ms: deadline.saturating_duration_since(started).as_millis() as u64 };
        let mut secure = SecureStream { stream, channel, buffer: vec![0u8; READ_BYTES], closed: false };
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(deadline_passed());
            }
            secure.stream.set_write_timeout(Some(remaining))?;
            secure.flush().map_err(|error| if timed_out(&error) { deadline_passed() } else { error.into() })?;
            if secure.channel.is_established() {
                return Ok(secure);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(deadline_passed());
            }
            secure.stream.set_read_timeout(Some(remaining))?;
            let read = match secure.stream.read(&mut secure.buffer) {
                Ok(0) => return Err(SecureError::BadHandshake("the connection closed during the handshake".into())),
                Ok(read) => read,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) if timed_out(&error) => return Err(deadline_passed()),
                Err(error) => return Err(error.into()),
            };
            if let Err(error) = secure.channel.receive(&secure.buffer[..read]) {
                // A refusal may wait in the outbox: send it, best effort.
                let _ = secure.flush();
                return Err(error);
            }
        }
    }

    /// Sets the read and write timeout of the stream (an idle peer's limit).
    pub fn set_io_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        self.stream.set_read_timeout(Some(timeout))?;
        self.stream.set_write_timeout(Some(timeout))
    }

    /// Who the other end proved to be.
    pub fn peer(&self) -> &Identity {
        self.channel.peer().expect("a SecureStream exists only after the handshake")
    }

    /// The underlying stream (addresses, shutdown).
    pub fn tcp(&self) -> &TcpStream {
        &self.stream
    }

    /// Sends one message (at most `message_bytes_max` bytes).
    pub fn send(&mut self, message: &[u8]) -> Result<(), SecureError> {
        self.channel.send(message)?;
        self.flush()?;
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let outgoing = self.channel.take_outgoing();
        if !outgoing.is_empty() {
            self.stream.write_all(&outgoing)?;
        }
        Ok(())
    }

    /// The next message; None when the peer closed between messages. A read timeout
    /// comes back as an `Io` error of kind `WouldBlock` or `TimedOut`.
    pub fn receive(&mut self) -> Result<Option<Vec<u8>>, SecureError> {
        loop {
            if let Some(message) = self.channel.next_message() {
                return Ok(Some(message));
            }
            if self.closed {
                return Ok(None);
            }
            let read = match self.stream.read(&mut self.buffer) {
                Ok(read) => read,
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error.into()),
            };
            if read == 0 {
                self.closed = true;
                if self.channel.in_message() {
                    return Err(SecureError::Truncated);
                }
                return Ok(None);
            }
            self.channel.receive(&self.buffer[..read])?;
        }
    }
}

fn timed_out(error: &std::io::Error) -> bool {
    matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: ClusterId = [0xc1; 16];

    fn signing(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn public(seed: u8) -> [u8; 32] {
        signing(seed).verifying_key().to_bytes()
    }

    /// Nodes "a" (seed 1) and "s" (seed 2) admitted; operator seed 9.
    fn keys() -> Arc<StaticPeerKeys> {
        let mut keys = StaticPeerKeys::of_nodes([("a", public(1)), ("s", public(2))]);
        keys.operators.push(public(9));
        Arc::new(keys)
    }

    fn node(name: &str, seed: u8) -> Arc<SecureConfig> {
        Arc::new(SecureConfig {
            cluster_id: CLUSTER,
            local: LocalIdentity::Node { name: name.to_string(), key: signing(seed) },
            keys: keys(),
            accept_operators: false,
            message_bytes_max: 1 << 20,
        })
    }

    fn with(config: &Arc<SecureConfig>, change: impl FnOnce(&mut SecureConfig)) -> Arc<SecureConfig> {
        let mut config = SecureConfig::clone(config);
        change(&mut config);
        Arc::new(config)
    }

    /// Moves bytes both ways until neither side has any to send; the first error.
    fn pump(a: &mut Channel, b: &mut Channel) -> Result<(), (Role, SecureError)> {
        for _ in 0..64 {
            let (to_b, to_a) = (a.take_outgoing(), b.take_outgoing());
            if to_a.is_empty() && to_b.is_empty() {
                return Ok(());
            }
            if !to_b.is_empty() {
                b.receive(&to_b).map_err(|error| (b.role(), error))?;
            }
            if !to_a.is_empty() {
                a.receive(&to_a).map_err(|error| (a.role(), error))?;
            }
        }
        panic!("the pump did not settle")
    }

    fn pair(
        client: Arc<SecureConfig>,
        server: Arc<SecureConfig>,
    ) -> (Channel, Channel, Result<(), (Role, SecureError)>) {
        let mut initiator = Channel::initiator(client, None).unwrap();
        let mut responder = Channel::responder(server).unwrap();
        let result = pump(&mut initiator, &mut responder);
        (initiator, responder, result)
    }

    /// Stream mode: bytes sealed in pieces of any size come out whole and in order,
    /// opened in place as they arrive in arbitrary cuts; bytes sent right after the
    /// handshake stay for the receiver; a changed byte, a replayed or a reordered frame
    /// fails.
    #[test]
    fn stream_mode_round_trips_bytes_cut_anywhere_and_refuses_tampering() {
        let mut client = Channel::initiator(node("a", 1), Some("s")).unwrap().for_stream();
        let mut server = Channel::responder(node("s", 2)).unwrap().for_stream();
        pump(&mut client, &mut server).unwrap();
        assert!(client.is_established() && server.is_established());
        let client = client.into_stream().unwrap();
        let server = server.into_stream().unwrap();
        assert_eq!(client.peer, Identity::Node("s".into()));
        assert_eq!(server.peer, Identity::Node("a".into()));
        assert!(client.received.is_empty() && server.received.is_empty() && client.outgoing.is_empty());
        let (mut sender, mut receiver) = (client.sender, server.receiver);
        let plaintext: Vec<u8> = (0..300_000u32).map(|index| (index * 7 + index / 251) as u8).collect();
        let mut wire = Vec::new();
        for piece in plaintext.chunks(70_001).chain(std::iter::once(&[][..])) {
            sender.seal(piece, &mut wire).unwrap();
        }
        // Nothing sealed is no frame at all.
        let expected = StreamSender::sealed_bytes(70_001) * 4 + StreamSender::sealed_bytes(300_000 - 4 * 70_001);
        assert_eq!(wire.len(), expected);
        let mut buffer = Vec::new();
        let mut plain_end = 0;
        let mut scratch = vec![0u8; NOISE_MESSAGE_BYTES_MAX];
        let mut opened = Vec::new();
        for cut in wire.chunks(9_973) {
            buffer.extend_from_slice(cut);
            plain_end = receiver.open_in_place(&mut buffer, plain_end, &mut scratch).unwrap();
            // The caller consumes some of the plaintext, as the reactor pushes frames.
            let take = plain_end / 2;
            opened.extend(buffer.drain(..take));
            plain_end -= take;
        }
        opened.extend_from_slice(&buffer[..plain_end]);
        assert_eq!(plain_end, buffer.len(), "no partial frame left");
        assert_eq!(opened, plaintext);

        // Tampering: a flipped bit, a replayed frame, a dropped frame.
        let mut frames = Vec::new();
        for piece in [&b"first"[..], b"second", b"third"] {
            let mut frame = Vec::new();
            sender.seal(piece, &mut frame).unwrap();
            frames.push(frame);
        }
        let mut flipped = frames[0].clone();
        flipped[5] ^= 0x40;
        let mut buffer = flipped;
        assert!(matches!(receiver.open_in_place(&mut buffer, 0, &mut scratch), Err(SecureError::BadMessage(_))));
        let mut buffer = frames[0].clone();
        assert_eq!(receiver.open_in_place(&mut buffer, 0, &mut scratch).unwrap(), 5);
        let mut replayed = frames[0].clone();
        assert!(receiver.open_in_place(&mut replayed, 0, &mut scratch).is_err(), "a replayed frame fails");
        let mut skipped = frames[2].clone();
        assert!(receiver.open_in_place(&mut skipped, 0, &mut scratch).is_err(), "a reordered frame fails");
        let mut short = vec![0u8, 3, 1, 2, 3];
        assert!(receiver.open_in_place(&mut short, 0, &mut scratch).is_err(), "a frame shorter than its tag");
    }

    /// A stream-mode channel leaves the bytes after its handshake unread: the server's
    /// identity and its first stream bytes arrive in one delivery, and the client's
    /// `into_stream` hands the stream bytes on.
    #[test]
    fn stream_mode_keeps_the_bytes_after_the_handshake() {
        let mut client = Channel::initiator(node("a", 1), None).unwrap().for_stream();
        let mut server = Channel::responder(node("s", 2)).unwrap().for_stream();
        server.receive(&client.take_outgoing()).unwrap();
        client.receive(&server.take_outgoing()).unwrap();
        server.receive(&client.take_outgoing()).unwrap();
        assert!(server.is_established() && !client.is_established());
        assert!(matches!(client.send(b"early"), Err(SecureError::NotEstablished)));
        let mut server = server.into_stream().unwrap();
        let mut delivery = std::mem::take(&mut server.outgoing);
        server.sender.seal(b"after", &mut delivery).unwrap();
        client.receive(&delivery).unwrap();
        let client = client.into_stream().unwrap();
        let (mut buffer, mut receiver) = (client.received, client.receiver);
        let mut scratch = vec![0u8; NOISE_MESSAGE_BYTES_MAX];
        assert_eq!(receiver.open_in_place(&mut buffer, 0, &mut scratch).unwrap(), 5);
        assert_eq!(&buffer, b"after");
        let not_established = Channel::initiator(node("a", 1), None).unwrap().for_stream();
        assert!(matches!(not_established.into_stream(), Err(SecureError::NotEstablished)));
        assert!(Channel::responder(node("s", 2)).unwrap().into_stream().is_err(), "not in stream mode");
    }

    #[test]
    fn a_round_trip_carries_small_and_chunked_messages_both_ways() {
        let (mut client, mut server, result) = pair(node("a", 1), node("s", 2));
        result.unwrap();
        assert!(client.is_established() && server.is_established());
        assert_eq!(client.peer(), Some(&Identity::Node("s".into())));
        assert_eq!(server.peer(), Some(&Identity::Node("a".into())));
        assert_eq!(client.handshake_hash(), server.handshake_hash());
        let big: Vec<u8> = (0..300_000u32).map(|index| (index % 253) as u8).collect();
        for message in [&b""[..], b"PING 1", &big[..SINGLE_FRAME_MESSAGE_BYTES_MAX], &big] {
            client.send(message).unwrap();
            server.send(message).unwrap();
        }
        // Fed one byte at a time on one side: framing does not depend on read sizes.
        for byte in client.take_outgoing() {
            server.receive(&[byte]).unwrap();
        }
        client.receive(&server.take_outgoing()).unwrap();
        for channel in [&mut client, &mut server] {
            assert_eq!(channel.next_message().unwrap(), b"");
            assert_eq!(channel.next_message().unwrap(), b"PING 1");
            assert_eq!(channel.next_message().unwrap(), &big[..SINGLE_FRAME_MESSAGE_BYTES_MAX]);
            assert_eq!(channel.next_message().unwrap(), big);
            assert!(channel.next_message().is_none());
        }
        // Overheads as documented: one frame for a single-frame message.
        client.send(&big[..SINGLE_FRAME_MESSAGE_BYTES_MAX]).unwrap();
        assert_eq!(client.outgoing().len(), SINGLE_FRAME_MESSAGE_BYTES_MAX + 4 + FRAME_OVERHEAD_BYTES);
    }

    #[test]
    fn a_peer_of_another_cluster_is_refused() {
        let stranger = with(&node("a", 1), |config| config.cluster_id = [0xee; 16]);
        let mut client = Channel::initiator(stranger, None).unwrap();
        let mut server = Channel::responder(node("s", 2)).unwrap();
        // The server checks the client first, refuses, and says why.
        let (role, error) = pump(&mut client, &mut server).unwrap_err();
        assert_eq!(role, Role::Responder);
        assert!(matches!(error, SecureError::WrongCluster { .. }) && error.is_authentication(), "{error}");
        assert!(server.is_failed() && server.peer().is_none());
        let error = client.receive(&server.take_outgoing()).unwrap_err();
        assert!(matches!(error, SecureError::Refused(Refusal::WrongCluster)), "{error}");
        // A server of another cluster: the same, seen from its side.
        let (_, _, result) = pair(node("a", 1), with(&node("s", 2), |config| config.cluster_id = [0xee; 16]));
        assert!(matches!(result, Err((Role::Responder, SecureError::WrongCluster { .. }))));
    }

    #[test]
    fn an_unknown_name_or_a_wrong_key_is_refused_and_told() {
        for (config, expected) in [(node("stranger", 1), Refusal::UnknownNode), (node("a", 7), Refusal::KeyMismatch)] {
            let mut client = Channel::initiator(config, None).unwrap();
            let mut server = Channel::responder(node("s", 2)).unwrap();
            let (role, error) = pump(&mut client, &mut server).unwrap_err();
            assert_eq!(role, Role::Responder);
            match expected {
                Refusal::UnknownNode => assert!(matches!(error, SecureError::UnknownNode { .. }), "{error}"),
                _ => assert!(matches!(error, SecureError::KeyMismatch { .. }), "{error}"),
            }
            assert!(server.is_failed() && server.next_message().is_none());
            // The refusal still goes out; the client learns why.
            let error = client.receive(&server.take_outgoing()).unwrap_err();
            assert!(matches!(error, SecureError::Refused(refusal) if refusal == expected), "{error}");
            assert!(client.send(b"x").is_err(), "a failed channel stays failed");
        }
        // A server with a key that is not the admitted one for its name.
        let (_, _, result) = pair(node("a", 1), node("s", 8));
        assert!(matches!(result, Err((Role::Initiator, SecureError::KeyMismatch { .. }))));
        // The client asked for another node.
        let mut client = Channel::initiator(node("a", 1), Some("t")).unwrap();
        let mut server = Channel::responder(node("s", 2)).unwrap();
        assert!(matches!(pump(&mut client, &mut server), Err((Role::Initiator, SecureError::UnexpectedPeer { .. }))));
    }

    #[test]
    fn operators_are_accepted_only_where_allowed_and_known() {
        let operator =
            |seed| with(&node("a", 1), |config| config.local = LocalIdentity::Operator { key: signing(seed) });
        let accepting = with(&node("s", 2), |config| config.accept_operators = true);
        let (_, server, result) = pair(operator(9), Arc::clone(&accepting));
        result.unwrap();
        assert_eq!(server.peer(), Some(&Identity::Operator(public(9))));
        let (_, _, result) = pair(operator(9), node("s", 2));
        assert!(matches!(result, Err((Role::Responder, SecureError::OperatorNotAccepted))));
        let (_, _, result) = pair(operator(10), accepting);
        assert!(matches!(result, Err((Role::Responder, SecureError::UnknownOperator { .. }))));
    }

    #[test]
    fn tampered_frames_are_refused() {
        // A flipped bit in the Noise answer: the handshake fails.
        let mut client = Channel::initiator(node("a", 1), None).unwrap();
        let mut server = Channel::responder(node("s", 2)).unwrap();
        server.receive(&client.take_outgoing()).unwrap();
        let mut answer = server.take_outgoing();
        answer[10] ^= 1;
        assert!(matches!(client.receive(&answer), Err(SecureError::BadHandshake(_))));
        // A flipped bit in an application message: refused, nothing delivered.
        let (mut client, mut server, result) = pair(node("a", 1), node("s", 2));
        result.unwrap();
        client.send(b"BLOB 00").unwrap();
        let mut frame = client.take_outgoing();
        let last = frame.len() - 1;
        frame[last] ^= 0x80;
        assert!(matches!(server.receive(&frame), Err(SecureError::BadMessage(_))));
        assert!(server.next_message().is_none() && server.is_failed());
        // A peer announcing a message over the limit.
        let small = with(&node("s", 2), |config| config.message_bytes_max = 100_000);
        let (mut client, mut server, result) = pair(node("a", 1), small);
        result.unwrap();
        client.send(&vec![0u8; 100_001]).unwrap();
        let error = server.receive(&client.take_outgoing()).unwrap_err();
        assert!(matches!(error, SecureError::MessageTooLarge { bytes: 100_001, max: 100_000 }), "{error}");
        assert!(matches!(server.send(&[0u8; 100_001]), Err(SecureError::Failed(_))));
    }

    #[test]
    fn replayed_handshakes_and_identities_fail() {
        // Record a whole client session, then play the client's bytes to a new server.
        let mut client = Channel::initiator(node("a", 1), None).unwrap();
        let mut server = Channel::responder(node("s", 2)).unwrap();
        let mut recorded = Vec::new();
        for _ in 0..3 {
            let bytes = client.take_outgoing();
            recorded.extend_from_slice(&bytes);
            server.receive(&bytes).unwrap();
            client.receive(&server.take_outgoing()).unwrap();
        }
        assert!(server.is_established());
        let mut replayed = Channel::responder(node("s", 2)).unwrap();
        let error = replayed.receive(&recorded).unwrap_err();
        assert!(matches!(error, SecureError::BadHandshake(_)), "{error}");
        assert!(replayed.peer().is_none());

        // A node that saw "a"'s identity in one session (it signs that session's hash)
        // cannot pass it off as its own in another: the signature does not check.
        let seen = identity_message(&node("a", 1), &client.handshake_hash().unwrap(), Role::Initiator);
        let mut relay = Channel::initiator(node("s", 2), None).unwrap();
        relay.identity_override = Some(seen);
        let mut victim = Channel::responder(node("s", 2)).unwrap();
        victim.receive(&relay.take_outgoing()).unwrap();
        relay.receive(&victim.take_outgoing()).unwrap();
        assert_ne!(relay.handshake_hash(), client.handshake_hash());
        let error = victim.receive(&relay.take_outgoing()).unwrap_err();
        assert!(matches!(error, SecureError::BadSignature { .. }), "{error}");
    }

    #[test]
    fn the_blocking_stream_meets_its_deadline_and_truncation() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let mut results = Vec::new();
            // Generous for the real client, short for the silent one.
            for deadline_ms in [10_000, 300, 10_000] {
                let (stream, _) = listener.accept().unwrap();
                let deadline = Instant::now() + Duration::from_millis(deadline_ms);
                results.push(SecureStream::accept(stream, node("s", 2), deadline).map(|mut secure| {
                    let message = secure.receive().unwrap().unwrap();
                    secure.send(&message).unwrap();
                    secure.peer().clone()
                }));
            }
            results
        });
        // 1: a real client: an echo.
        let mut client = SecureStream::connect(addr, node("a", 1), Some("s"), Duration::from_secs(5)).unwrap();
        client.send(b"hello").unwrap();
        assert_eq!(client.receive().unwrap().unwrap(), b"hello");
        assert_eq!(client.peer(), &Identity::Node("s".into()));
        // 2: silent: the server gives up at its deadline.
        let silent = TcpStream::connect(addr).unwrap();
        // 3: half the first frame, then closed (accepted after the silent one).
        let mut first = Channel::initiator(node("a", 1), None).unwrap().take_outgoing();
        first.truncate(10);
        let mut truncated = TcpStream::connect(addr).unwrap();
        truncated.write_all(&first).unwrap();
        drop(truncated);
        let results = server.join().unwrap();
        drop(silent);
        assert_eq!(results[0].as_ref().unwrap(), &Identity::Node("a".into()));
        assert!(matches!(results[1], Err(SecureError::Deadline { .. })), "{:?}", results[1]);
        assert!(matches!(results[2], Err(SecureError::BadHandshake(_))), "{:?}", results[2]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Arbitrary bytes, whole or in pieces, at any phase, never panic a channel.
        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
            split in 0usize..2048,
            phase in 0u8..4,
        ) {
            let (mut client, mut server) =
                (Channel::initiator(node("a", 1), None).unwrap(), Channel::responder(node("s", 2)).unwrap());
            if phase >= 1 {
                server.receive(&client.take_outgoing()).unwrap();
            }
            if phase >= 2 {
                client.receive(&server.take_outgoing()).unwrap();
            }
            if phase >= 3 {
                pump(&mut client, &mut server).unwrap();
            }
            let split = split.min(bytes.len());
            for channel in [&mut client, &mut server] {
                let _ = channel.receive(&bytes[..split]);
                let _ = channel.receive(&bytes[split..]);
                while channel.next_message().is_some() {}
                // A valid-looking frame header with random contents too.
                let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&bytes);
                let _ = channel.receive(&framed);
            }
        }
    }
}
