//! Codes the two ends exchange outside frames: when a server refuses one request it resets the
//! stream with a code, and when it drops a whole connection it closes it with a code. Both are
//! part of the wire protocol; change them only with [`crate::PROTOCOL_VERSION`].

use std::ops::RangeInclusive;

use quinn::VarInt;

use crate::{TransportError, FRAME_BYTES_MAX, PROTOCOL_VERSION};

/// Connection close: the server is shutting down.
pub(crate) const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(0);
/// Connection close: the client certificate is from the CA but names no role we know.
pub(crate) const CLOSE_UNKNOWN_ROLE: VarInt = VarInt::from_u32(1);
/// Connection close: the client dropped the pooled connection ([`crate::Client::forget`]).
pub(crate) const CLOSE_FORGOTTEN: VarInt = VarInt::from_u32(2);

/// Stream reset: the request frame declared more than [`FRAME_BYTES_MAX`].
pub(crate) const STREAM_FRAME_TOO_LARGE: VarInt = VarInt::from_u32(1);
/// Stream reset: the request did not start with the magic bytes or ended early.
pub(crate) const STREAM_MALFORMED: VarInt = VarInt::from_u32(2);
/// Stream reset: the request did not arrive within the server's read timeout.
pub(crate) const STREAM_READ_TIMEOUT: VarInt = VarInt::from_u32(3);
/// Stream reset: the handler did not answer within the server's handler timeout.
pub(crate) const STREAM_HANDLER_TIMEOUT: VarInt = VarInt::from_u32(4);
/// Stream reset: the request's frame version differs; the server adds its own version to this
/// base, so the client learns which version the server speaks.
pub(crate) const STREAM_VERSION_MISMATCH_BASE: u32 = 0x100;

/// QUIC's CONNECTION_REFUSED transport error (RFC 9000 §20.1), sent when a server refuses an
/// incoming connection (ours does at its connection limit).
pub(crate) const QUIC_CONNECTION_REFUSED: u64 = 0x2;
/// QUIC's CRYPTO_ERROR range: TLS alerts travel as 0x100 + alert (RFC 9001 §4.8).
pub(crate) const QUIC_CRYPTO_ERRORS: RangeInclusive<u64> = 0x100..=0x1ff;

pub(crate) fn version_mismatch_code() -> VarInt {
    VarInt::from_u32(STREAM_VERSION_MISMATCH_BASE + u32::from(PROTOCOL_VERSION))
}

/// The error a stream code means to the client that sent a request of `request_len` bytes.
pub(crate) fn refusal(code: u64, request_len: usize) -> TransportError {
    let version_codes =
        u64::from(STREAM_VERSION_MISMATCH_BASE)..=u64::from(STREAM_VERSION_MISMATCH_BASE + 0xff);
    match code {
        c if c == STREAM_FRAME_TOO_LARGE.into_inner() => {
            TransportError::FrameTooLarge { len: request_len as u64, limit: FRAME_BYTES_MAX as u64 }
        }
        c if c == STREAM_MALFORMED.into_inner() => TransportError::Malformed {
            reason: "the peer could not parse our request frame".to_owned(),
        },
        c if c == STREAM_READ_TIMEOUT.into_inner() => {
            TransportError::Timeout { what: "peer reading our request" }
        }
        c if c == STREAM_HANDLER_TIMEOUT.into_inner() => {
            TransportError::Timeout { what: "peer handling our request" }
        }
        c if version_codes.contains(&c) => TransportError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            // In range by the guard: at most 0xff above the base.
            theirs: (c - u64::from(STREAM_VERSION_MISMATCH_BASE)) as u8,
        },
        code => TransportError::Reset { code },
    }
}
