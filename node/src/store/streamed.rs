//! Reads that answer in pieces: a large `get`, `toc`, `query` or `json-export` is made from the
//! document's file as it was when opened, read in ranges, so neither the document nor the answer
//! is copied whole whatever its size. The node streams the pieces to the gateway.

use std::path::PathBuf;

use proto::streamed::{AnswerStream, OrderedRead};
use proto::{SqRequest, SqResponse};

use super::execute::validate;
use super::{check_tenant_id, Store, StoreError, VfsReader};

impl Store {
    /// A `get`, `toc`, `query` or `json-export` that streams a large answer: built whole up to
    /// `stream_above` bytes; past it, its length and the document's file as it is now, from
    /// which the answer is made while the file is read in ranges ([`FileAnswer`]), so no copy
    /// of the document or the answer is built whatever its size. Later writes do not show in it.
    /// Any other request is refused.
    pub fn open_read(
        &self,
        id: &str,
        req: &SqRequest,
        stream_above: u64,
    ) -> Result<Opened, StoreError> {
        check_tenant_id(id)?;
        validate(req)?;
        let Some((p, read)) = OrderedRead::of(req) else {
            return Err(StoreError::InvalidRequest(format!(
                "{} is not answered in pieces",
                req.route().name()
            )));
        };
        self.on_loaded(id, |t| t.open_read(p, &read, stream_above))
    }
}

/// A read's answer: whole, or a large answer's length and the file it is made from.
pub enum Opened {
    Whole(SqResponse),
    Stream { len: u64, json: bool, file: Box<FileAnswer> },
}

/// A large answer still to be made: the document's file, opened at one moment, and the maker of
/// the answer from its bytes. [`FileAnswer::next_piece`] reads the file in ranges and gives the
/// answer a piece at a time, so it holds one range and one piece whatever the sizes.
pub struct FileAnswer {
    path: PathBuf,
    reader: Box<dyn VfsReader>,
    answer: AnswerStream,
    /// The next file offset to read.
    offset: u64,
    /// Bytes read from the file, used up to `used`.
    pending: Vec<u8>,
    used: usize,
    finished: bool,
}

/// Bytes a piece of a [`FileAnswer`] may run over the size asked for: one row's opening.
const PIECE_SLACK_BYTES: usize = 256;

impl FileAnswer {
    pub(super) fn new(
        path: PathBuf,
        reader: Box<dyn VfsReader>,
        answer: AnswerStream,
    ) -> FileAnswer {
        FileAnswer {
            path,
            reader,
            answer,
            offset: 0,
            pending: Vec::new(),
            used: 0,
            finished: false,
        }
    }

    /// The next piece of the answer, `piece_bytes` long or a little more (the last may be
    /// shorter), reading the file at most `piece_bytes` at a time; `None` once the answer is
    /// complete. A file that ends early or does not read as a phext is an error: the answer
    /// cannot be finished.
    pub fn next_piece(&mut self, piece_bytes: usize) -> Result<Option<Vec<u8>>, StoreError> {
        let piece_bytes = piece_bytes.max(1);
        let file_len = self.reader.file_len();
        let mut out = Vec::with_capacity(piece_bytes + PIECE_SLACK_BYTES);
        while out.len() < piece_bytes && !self.finished {
            let drained = self.used == self.pending.len();
            if self.answer.done() || (drained && self.offset >= file_len) {
                self.finished = self.answer.finish(&mut out, piece_bytes);
                break;
            }
            if drained {
                let want = (file_len - self.offset).min(piece_bytes as u64) as usize;
                self.pending = self
                    .reader
                    .read_at(self.offset, want)
                    .map_err(StoreError::io("read phext", &self.path))?;
                self.used = 0;
                if self.pending.is_empty() {
                    let detail = format!("ended at {} of {file_len} bytes", self.offset);
                    return Err(StoreError::corrupt(&self.path, detail));
                }
                self.offset += self.pending.len() as u64;
            }
            self.used += self
                .answer
                .feed(&self.pending[self.used..], &mut out, piece_bytes)
                .map_err(|e| StoreError::corrupt(&self.path, e.to_string()))?;
        }
        Ok((!out.is_empty()).then_some(out))
    }
}
