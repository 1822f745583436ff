//! The crate's one error type, and the one place where quinn's errors are classified.

use std::net::SocketAddr;

use quinn::{ConnectionError, ReadError, WriteError};

use crate::codes;

pub type Result<T, E = TransportError> = std::result::Result<T, E>;

/// Everything that can go wrong moving a frame. Callers branch on the variant: the gateway
/// answers 503 for [`TransportError::is_unavailable`] errors and logs the rest loudly, because
/// they mean a misconfigured cluster (wrong CA, wrong version) rather than a dead peer.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// No connection could be made: nothing answered, the handshake did not finish in time,
    /// or the peer refused a new connection because it is at its connection limit.
    #[error("connect to {addr} failed: {reason}")]
    Connect { addr: SocketAddr, reason: String },

    /// A bounded wait ran out. `what` names the wait.
    #[error("timed out: {what}")]
    Timeout { what: &'static str },

    /// The connection closed or was lost (peer shut down, restarted, went idle, or we closed it).
    #[error("connection closed: {reason}")]
    Closed { reason: String },

    /// The peer reset the stream with a code this version does not know.
    #[error("stream reset by peer with code {code}")]
    Reset { code: u64 },

    /// The TLS handshake failed: a certificate missing, expired or not from the cluster CA,
    /// or no common ALPN protocol. Either side may have refused.
    #[error("TLS refused: {reason}")]
    Tls { reason: String },

    /// The peer completed TLS but refused us: our certificate names no role it knows.
    #[error("refused by peer: {reason}")]
    Refused { reason: String },

    /// A frame larger than [`crate::FRAME_BYTES_MAX`], refused before it was buffered.
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge { len: u64, limit: u64 },

    /// The peer speaks another frame version. `ours` is this build's version.
    #[error("protocol version mismatch: ours {ours}, theirs {theirs}")]
    VersionMismatch { ours: u8, theirs: u8 },

    /// A frame that does not start with the magic bytes, or ends before its declared length.
    #[error("malformed frame: {reason}")]
    Malformed { reason: String },

    /// A payload that did not decode into the expected type.
    #[error("decode failed: {0}")]
    Decode(String),

    /// A value that could not be encoded (a serde error in the caller's type).
    #[error("encode failed: {0}")]
    Encode(String),

    /// A local I/O error, e.g. binding the UDP socket.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),

    /// Creating, issuing, reading or parsing a certificate or key failed.
    #[error("certificate: {0}")]
    Cert(String),

    /// A limit or configuration value quinn or rustls cannot accept.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl TransportError {
    /// True when the peer is (perhaps briefly) unreachable and a later retry may succeed:
    /// the caller should answer "unavailable" (503), not "broken".
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::Connect { .. } | Self::Timeout { .. } | Self::Closed { .. } | Self::Reset { .. }
        )
    }
}

/// Classifies a connection-level failure. TLS alerts (QUIC crypto error codes) become
/// [`TransportError::Tls`], our own close codes become what they mean, the rest is `Closed`.
pub(crate) fn from_connection(error: ConnectionError) -> TransportError {
    if let Some(reason) = tls_failure(&error) {
        return TransportError::Tls { reason };
    }
    match error {
        ConnectionError::ApplicationClosed(close)
            if close.error_code == codes::CLOSE_UNKNOWN_ROLE =>
        {
            TransportError::Refused { reason: close.to_string() }
        }
        ConnectionError::ConnectionClosed(close)
            if u64::from(close.error_code) == codes::QUIC_CONNECTION_REFUSED =>
        {
            TransportError::Closed { reason: format!("peer at its connection limit: {close}") }
        }
        other => TransportError::Closed { reason: other.to_string() },
    }
}

/// Classifies a failure while the handshake is still running: anything but a TLS refusal
/// means we never reached the peer, so it is a [`TransportError::Connect`].
pub(crate) fn from_handshake(addr: SocketAddr, error: ConnectionError) -> TransportError {
    match tls_failure(&error) {
        Some(reason) => TransportError::Tls { reason },
        None => TransportError::Connect { addr, reason: error.to_string() },
    }
}

pub(crate) fn from_read(error: ReadError) -> TransportError {
    match error {
        ReadError::Reset(code) => TransportError::Reset { code: code.into_inner() },
        ReadError::ConnectionLost(e) => from_connection(e),
        other => TransportError::Closed { reason: other.to_string() },
    }
}

pub(crate) fn from_write(error: WriteError) -> TransportError {
    match error {
        WriteError::Stopped(code) => TransportError::Reset { code: code.into_inner() },
        WriteError::ConnectionLost(e) => from_connection(e),
        other => TransportError::Closed { reason: other.to_string() },
    }
}

/// QUIC carries TLS alerts as transport error codes 0x100..=0x1ff (RFC 9001 §4.8), whether we
/// raised them locally (`TransportError`) or the peer sent them (`ConnectionClosed`).
fn tls_failure(error: &ConnectionError) -> Option<String> {
    let code = match error {
        ConnectionError::TransportError(e) => u64::from(e.code),
        ConnectionError::ConnectionClosed(close) => u64::from(close.error_code),
        _ => return None,
    };
    codes::QUIC_CRYPTO_ERRORS.contains(&code).then(|| error.to_string())
}
