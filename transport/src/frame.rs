//! The wire frame: `[b"SQC"][PROTOCOL_VERSION: u8][len: u32 big-endian][payload: len bytes]`.
//!
//! One frame travels each way on a stream, except that an answer may be streamed: its header
//! frame, then body frames, each at most [`FRAME_BYTES_MAX`], up to the stream's end. The payload is opaque here; [`encode`] and
//! [`decode`] are the bincode helpers the crates above use to fill it.

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream};
use serde::{de::DeserializeOwned, Serialize};

use crate::error::{self, Result, TransportError};

/// The first bytes of every frame, so a stray or misdirected stream fails loudly.
pub const MAGIC: [u8; 3] = *b"SQC";

/// The frame version. A peer sending another version is refused with
/// [`TransportError::VersionMismatch`]. Bump it together with [`crate::ALPN`] whenever the
/// frame layout or the meaning of any payload type changes incompatibly.
pub const PROTOCOL_VERSION: u8 = 1;

/// Bytes before the payload: magic, version, length.
pub const HEADER_BYTES: usize = MAGIC.len() + 1 + 4;

/// The largest payload either side accepts: one message, `proto::wire::MESSAGE_BYTES_MAX`
/// (64 MiB), which says why. Anything larger must be split by the caller.
pub const FRAME_BYTES_MAX: usize = proto::wire::MESSAGE_BYTES_MAX;

/// The largest piece read from the stream at once: 64 KiB. The buffer grows with the bytes
/// that actually arrive, so a peer that declares a large frame and sends nothing costs nothing.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// The header for a payload of `len` bytes, in this build's version.
pub fn header(len: usize) -> Result<[u8; HEADER_BYTES]> {
    if len > FRAME_BYTES_MAX {
        return Err(TransportError::FrameTooLarge {
            len: len as u64,
            limit: FRAME_BYTES_MAX as u64,
        });
    }
    // Cannot fail: FRAME_BYTES_MAX fits in u32.
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    Ok(raw_header(PROTOCOL_VERSION, len))
}

/// A header with any version and length; tests use it to play a misbehaving peer.
pub(crate) fn raw_header(version: u8, len: u32) -> [u8; HEADER_BYTES] {
    let mut out = [0u8; HEADER_BYTES];
    out[..3].copy_from_slice(&MAGIC);
    out[3] = version;
    out[4..].copy_from_slice(&len.to_be_bytes());
    out
}

/// Checks a received header and returns the payload length it declares.
pub fn parse_header(header: &[u8; HEADER_BYTES]) -> Result<usize> {
    if header[..3] != MAGIC {
        return Err(TransportError::Malformed { reason: format!("bad magic {:?}", &header[..3]) });
    }
    if header[3] != PROTOCOL_VERSION {
        return Err(TransportError::VersionMismatch { ours: PROTOCOL_VERSION, theirs: header[3] });
    }
    let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(TransportError::FrameTooLarge {
            len: len as u64,
            limit: FRAME_BYTES_MAX as u64,
        });
    }
    Ok(len)
}

/// Reads exactly one frame and the end of the stream after it: each side finishes its stream
/// right after its one frame, so the end arrives with the last bytes. Reading it closes the
/// stream cleanly; a stream dropped before its end makes quinn send STOP_SENDING, one more
/// packet per call for both peers to process. Bytes after the frame are refused as malformed.
/// Stream resets come back as [`TransportError::Reset`] for the caller to interpret; this
/// layer knows no codes.
pub(crate) async fn read_frame(recv: &mut RecvStream) -> Result<Bytes> {
    let mut header = [0u8; HEADER_BYTES];
    recv.read_exact(&mut header).await.map_err(|e| match e {
        quinn::ReadExactError::FinishedEarly(n) => TransportError::Malformed {
            reason: format!("stream ended after {n} of {HEADER_BYTES} header bytes"),
        },
        quinn::ReadExactError::ReadError(e) => error::from_read(e),
    })?;
    let len = parse_header(&header)?;
    let mut payload = BytesMut::with_capacity(len.min(READ_CHUNK_BYTES));
    while payload.len() < len {
        let want = (len - payload.len()).min(READ_CHUNK_BYTES);
        match recv.read_chunk(want, true).await.map_err(error::from_read)? {
            Some(chunk) => payload.extend_from_slice(&chunk.bytes),
            None => {
                return Err(TransportError::Malformed {
                    reason: format!("stream ended after {} of {len} payload bytes", payload.len()),
                })
            }
        }
    }
    match recv.read_chunk(1, true).await.map_err(error::from_read)? {
        None => Ok(payload.freeze()),
        Some(_) => {
            Err(TransportError::Malformed { reason: format!("bytes after the {len}-byte frame") })
        }
    }
}

/// Reads one frame of a streamed answer's body, or `None` where the stream ends cleanly
/// between frames. Each frame is bounded by [`FRAME_BYTES_MAX`] like any other.
pub(crate) async fn read_body_frame(recv: &mut RecvStream) -> Result<Option<Bytes>> {
    let mut header = [0u8; HEADER_BYTES];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(n)) => {
            return Err(TransportError::Malformed {
                reason: format!("stream ended after {n} of {HEADER_BYTES} header bytes"),
            })
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(error::from_read(e)),
    }
    let len = parse_header(&header)?;
    let mut payload = BytesMut::with_capacity(len.min(READ_CHUNK_BYTES));
    while payload.len() < len {
        let want = (len - payload.len()).min(READ_CHUNK_BYTES);
        match recv.read_chunk(want, true).await.map_err(error::from_read)? {
            Some(chunk) => payload.extend_from_slice(&chunk.bytes),
            None => {
                return Err(TransportError::Malformed {
                    reason: format!("stream ended after {} of {len} payload bytes", payload.len()),
                })
            }
        }
    }
    Ok(Some(payload.freeze()))
}

/// Reads the header frame of an answer whose body may follow: like [`read_frame`], but the
/// stream stays open for [`read_body_frame`].
pub(crate) async fn read_head_frame(recv: &mut RecvStream) -> Result<Bytes> {
    read_body_frame(recv).await?.ok_or_else(|| TransportError::Malformed {
        reason: "stream ended before the answer".into(),
    })
}

/// Writes one frame (header, then the payload without copying it).
pub(crate) async fn write_frame(send: &mut SendStream, payload: Bytes) -> Result<()> {
    let header = Bytes::copy_from_slice(&header(payload.len())?);
    send.write_all_chunks(&mut [header, payload]).await.map_err(error::from_write)
}

/// The bincode configuration of every payload: `standard()` (little-endian varints), and decoding
/// refuses to allocate more than a frame can hold.
fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<FRAME_BYTES_MAX>()
}

/// Encodes a payload with bincode 2 (serde API).
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    bincode::serde::encode_to_vec(value, config())
        .map_err(|e| TransportError::Encode(e.to_string()))
}

/// The most a [`decode`] of `payload_len` bytes may claim (allocate), in bytes: proto's
/// [`proto::wire::decode_claim_budget`] under [`FRAME_BYTES_MAX`].
pub fn decode_claim_budget(payload_len: usize) -> usize {
    proto::wire::decode_claim_budget(payload_len, FRAME_BYTES_MAX)
}

/// Decodes a payload produced by [`encode`]; trailing bytes are an error, since they mean the
/// two ends disagree about the type. It claims at most [`decode_claim_budget`] bytes
/// ([`proto::wire::decode_bounded`]).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    let (value, used) = proto::wire::decode_bounded::<T, FRAME_BYTES_MAX>(bytes)
        .map_err(|e| TransportError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(TransportError::Decode(format!(
            "{} trailing bytes after the value",
            bytes.len() - used
        )));
    }
    Ok(value)
}
