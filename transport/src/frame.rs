//! The wire frame: `[b"SQC"][PROTOCOL_VERSION: u8][len: u32 big-endian][payload: len bytes]`.
//!
//! One frame travels each way on a stream, except that an answer may be streamed: its header
//! frame, then body frames, each at most [`FRAME_BYTES_MAX`], up to the stream's end. Before an
//! answer's first frame the server may send progress frames (`[b"SQP"][PROTOCOL_VERSION][0: u32]`,
//! [`PROGRESS`], no payload) while its handler is still working (every [`crate::ServerLimits::progress_interval`]), so a caller can
//! tell a peer at work on a large answer from a hung one without guessing how long the work
//! takes; callers skip them. The payload is opaque here; [`encode`] and [`decode`] are the
//! bincode helpers the crates above use to fill it.

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream};
use serde::{de::DeserializeOwned, Serialize};

use crate::error::{self, Result, TransportError};

/// The first bytes of every frame, so a stray or misdirected stream fails loudly.
pub const MAGIC: [u8; 3] = *b"SQC";

/// The frame version. A peer sending another version is refused with
/// [`TransportError::VersionMismatch`]. Bump it together with [`crate::ALPN`] whenever the
/// frame layout or the meaning of any payload type changes incompatibly. Version 2: progress
/// frames ([`PROGRESS`]) may come before an answer, which a version 1 caller would refuse.
pub const PROTOCOL_VERSION: u8 = 2;

/// Bytes before the payload: magic, version, length.
pub const HEADER_BYTES: usize = MAGIC.len() + 1 + 4;

/// The first bytes of a progress frame, in place of [`MAGIC`].
pub const PROGRESS_MAGIC: [u8; 3] = *b"SQP";

/// A progress frame, all of it: a header with [`PROGRESS_MAGIC`], this version and no payload.
/// No frame of an answer can be taken for it, since every other frame starts with [`MAGIC`].
pub const PROGRESS: [u8; HEADER_BYTES] =
    [PROGRESS_MAGIC[0], PROGRESS_MAGIC[1], PROGRESS_MAGIC[2], PROTOCOL_VERSION, 0, 0, 0, 0];

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
    let header = read_header(recv).await?.ok_or_else(|| TransportError::Malformed {
        reason: format!("stream ended after 0 of {HEADER_BYTES} header bytes"),
    })?;
    let payload = read_payload(recv, parse_header(&header)?).await?;
    read_end(recv, payload).await
}

/// Reads one frame of a streamed answer's body, or `None` where the stream ends cleanly
/// between frames. Each frame is bounded by [`FRAME_BYTES_MAX`] like any other.
pub(crate) async fn read_body_frame(recv: &mut RecvStream) -> Result<Option<Bytes>> {
    match read_header(recv).await? {
        None => Ok(None),
        Some(header) => Ok(Some(read_payload(recv, parse_header(&header)?).await?)),
    }
}

/// What comes before an answer's head: progress, or the head itself.
pub(crate) enum BeforeHead {
    Progress,
    Head(Bytes),
}

/// Reads the next frame before an answer's head: a progress frame, or the head. The stream
/// stays open for [`read_body_frame`].
pub(crate) async fn read_head_frame(recv: &mut RecvStream) -> Result<BeforeHead> {
    let header = read_header(recv).await?.ok_or_else(|| TransportError::Malformed {
        reason: "stream ended before the answer".into(),
    })?;
    if header == PROGRESS {
        return Ok(BeforeHead::Progress);
    }
    Ok(BeforeHead::Head(read_payload(recv, parse_header(&header)?).await?))
}

/// Reads a whole answer as [`read_frame`] does, after any progress frames.
pub(crate) async fn read_answer_frame(recv: &mut RecvStream) -> Result<Bytes> {
    loop {
        if let BeforeHead::Head(answer) = read_head_frame(recv).await? {
            return read_end(recv, answer).await;
        }
    }
}

/// A frame's header, or `None` where the stream ends cleanly before one.
async fn read_header(recv: &mut RecvStream) -> Result<Option<[u8; HEADER_BYTES]>> {
    let mut header = [0u8; HEADER_BYTES];
    match recv.read_exact(&mut header).await {
        Ok(()) => Ok(Some(header)),
        Err(quinn::ReadExactError::FinishedEarly(0)) => Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(n)) => Err(TransportError::Malformed {
            reason: format!("stream ended after {n} of {HEADER_BYTES} header bytes"),
        }),
        Err(quinn::ReadExactError::ReadError(e)) => Err(error::from_read(e)),
    }
}

/// A payload of `len` bytes (already checked against the limit), in a buffer that grows with
/// the bytes that arrive.
async fn read_payload(recv: &mut RecvStream, len: usize) -> Result<Bytes> {
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
    Ok(payload.freeze())
}

/// `frame`, once the stream's end follows it.
async fn read_end(recv: &mut RecvStream, frame: Bytes) -> Result<Bytes> {
    match recv.read_chunk(1, true).await.map_err(error::from_read)? {
        None => Ok(frame),
        Some(_) => Err(TransportError::Malformed {
            reason: format!("bytes after the {}-byte frame", frame.len()),
        }),
    }
}

/// Writes a progress frame.
pub(crate) async fn write_progress(send: &mut SendStream) -> Result<()> {
    send.write_all(&PROGRESS).await.map_err(error::from_write)
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
