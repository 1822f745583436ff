//! The bodies of streamed answers: a large read made from a document's file, and a file sent a
//! chunk at a time, each piece made on the blocking pool once the transport took the one before.

use bytes::Bytes;

use crate::store::{FileAnswer, VfsReader};

/// The largest body frame of a streamed answer: 1 MiB, far under the frame limit, so the frames
/// in flight cost a few MiB whatever the document's size.
const STREAM_CHUNK_BYTES: u64 = 1 << 20;

/// The body of a streamed read: the answer of `file`, made on the blocking pool a piece of about
/// [`STREAM_CHUNK_BYTES`] at a time, each only once the transport took the one before. A file
/// that cannot be read ends the body early (logged); the gateway sees fewer bytes than the `len`
/// announced and cuts its answer, so a client never takes a short body for a whole one.
pub(super) fn answer_body(len: u64, file: Box<FileAnswer>) -> transport::AnswerBody {
    transport::body_unfold((file, 0u64), move |(mut file, sent)| async move {
        let made = crate::blocking::spawn(move || {
            let piece = file.next_piece(STREAM_CHUNK_BYTES as usize);
            (file, piece)
        })
        .await;
        match made {
            Ok((file, Ok(Some(piece)))) => {
                let sent = sent + piece.len() as u64;
                Some((Bytes::from(piece), (file, sent)))
            }
            Ok((_, Ok(None))) => {
                if sent != len {
                    tracing::warn!(sent, len, "streamed answer came out another length");
                }
                None
            }
            Ok((_, Err(e))) => {
                tracing::warn!(sent, len, error = %e, "making a streamed answer failed");
                None
            }
            Err(e) => {
                tracing::warn!(sent, len, error = %e, "streaming task failed");
                None
            }
        }
    })
}

/// `len` bytes of a file from `offset`, read from `reader` a chunk at a time on the blocking
/// pool, each only once the transport took the one before. A read that fails or comes short
/// ends the body early (logged); the receiver sees fewer bytes than announced.
pub(crate) fn file_body(
    reader: Box<dyn VfsReader>,
    offset: u64,
    len: u64,
) -> transport::AnswerBody {
    let end = offset.saturating_add(len);
    transport::body_unfold((reader, offset), move |(reader, offset)| async move {
        if offset >= end {
            return None;
        }
        let want = STREAM_CHUNK_BYTES.min(end - offset) as usize;
        let read = crate::blocking::spawn(move || {
            let piece = reader.read_at(offset, want);
            (reader, piece)
        })
        .await;
        match read {
            Ok((reader, Ok(piece))) if !piece.is_empty() => {
                let next = offset + piece.len() as u64;
                Some((Bytes::from(piece), (reader, next)))
            }
            Ok((_, Ok(_))) => {
                tracing::warn!(offset, end, "streamed file ended early");
                None
            }
            Ok((_, Err(e))) => {
                tracing::warn!(offset, end, error = %e, "reading a streamed file failed");
                None
            }
            Err(e) => {
                tracing::warn!(offset, end, error = %e, "streaming task failed");
                None
            }
        }
    })
}
