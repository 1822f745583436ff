//! Answers made from a document's canonical bytes as they are read, a piece at a time.
//!
//! `get`, `toc`, `query` and `json-export` each walk a document's scrolls in coordinate order,
//! which is the order of its canonical bytes. So an answer too large to build in memory can be
//! made while those bytes are read from the document's file in ranges: [`AnswerStream`] takes
//! them in pieces of any size (split anywhere, even inside a character) and gives the answer's
//! bytes in pieces of about the size asked for, holding nothing of the document but the
//! coordinate it has reached. Its answer is byte for byte what [`OrderedRead::answer`] builds
//! from the same document, and [`OrderedRead::answer_len`] says its length first.

use std::io::Write as _;

use crate::coord::{break_dimension, Coordinate};
use crate::doc::{Doc, FormatError};
use crate::ops;
use crate::request::{Selector, SqRequest, SqResponse};
use crate::PhextName;

/// A read whose answer follows the document's scrolls in coordinate order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderedRead {
    Get,
    Toc,
    Query { selector: Selector, limit: Option<usize> },
    JsonExport,
}

impl OrderedRead {
    /// The document a request reads and how, when it is one of these reads.
    pub fn of(request: &SqRequest) -> Option<(&PhextName, OrderedRead)> {
        match request {
            SqRequest::Get { p } => Some((p, OrderedRead::Get)),
            SqRequest::Toc { p } => Some((p, OrderedRead::Toc)),
            SqRequest::Query { p, selector, limit } => {
                Some((p, OrderedRead::Query { selector: selector.clone(), limit: *limit }))
            }
            SqRequest::JsonExport { p } => Some((p, OrderedRead::JsonExport)),
            _ => None,
        }
    }

    /// True when the answer is JSON rather than plain text.
    pub fn is_json(&self) -> bool {
        matches!(self, OrderedRead::Query { .. } | OrderedRead::JsonExport)
    }

    /// The answer's length for `doc`, computed without building it.
    pub fn answer_len(&self, doc: &Doc) -> u64 {
        match self {
            OrderedRead::Get => doc.canonical_len(),
            OrderedRead::Toc => ops::toc_len(doc),
            OrderedRead::Query { selector, limit } => ops::query_len(doc, selector, *limit),
            OrderedRead::JsonExport => ops::json_export_len(doc),
        }
    }

    /// The answer for `doc`, built whole in memory. Size it first with [`Self::answer_len`].
    pub fn answer(&self, doc: &Doc) -> SqResponse {
        let body = match self {
            OrderedRead::Get => doc.to_canonical(),
            OrderedRead::Toc => ops::toc(doc).into_bytes(),
            OrderedRead::Query { selector, limit } => ops::query(doc, selector, *limit),
            OrderedRead::JsonExport => ops::json_export(doc).into_bytes(),
        };
        SqResponse { body, json: self.is_json() }
    }

    /// A maker of this answer from the document's canonical bytes.
    pub fn stream(&self) -> AnswerStream {
        let shape = match self {
            OrderedRead::Get => Shape::Get,
            OrderedRead::Toc => Shape::Toc { first_line: false },
            OrderedRead::Query { selector, limit } => {
                let mut set = selector.set.clone();
                set.sort();
                set.dedup();
                Shape::Query {
                    set,
                    next_set: 0,
                    range: selector.range,
                    limit: limit.map_or(u64::MAX, |l| l as u64),
                    selected: false,
                }
            }
            OrderedRead::JsonExport => Shape::JsonExport,
        };
        AnswerStream {
            shape,
            at: Coordinate::ORIGIN,
            in_scroll: false,
            started: false,
            rows: 0,
            complete: false,
        }
    }
}

/// What an [`AnswerStream`] makes, with the state that answer needs between scrolls.
#[derive(Debug)]
enum Shape {
    /// The canonical bytes themselves.
    Get,
    /// `first_line`: the scroll being read is still in its first line.
    Toc {
        first_line: bool,
    },
    /// `set` sorted, `next_set` its first entry not answered yet; `selected`: the scroll being
    /// read is a row of the answer.
    Query {
        set: Vec<Coordinate>,
        next_set: usize,
        range: Option<(Coordinate, Coordinate)>,
        limit: u64,
        selected: bool,
    },
    JsonExport,
}

/// Makes a read's answer from a document's canonical bytes, fed in order
/// ([`OrderedRead::stream`]).
#[derive(Debug)]
pub struct AnswerStream {
    shape: Shape,
    /// The coordinate the bytes read so far lead to.
    at: Coordinate,
    /// A scroll's text is being read.
    in_scroll: bool,
    /// The answer's opening is written.
    started: bool,
    /// Scrolls listed (toc), rows written (query, json-export).
    rows: u64,
    /// The answer's end is written.
    complete: bool,
}

/// True for the nine dimension breaks, by byte.
const IS_BREAK: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < crate::coord::BREAKS.len() {
        table[crate::coord::BREAKS[i] as usize] = true;
        i += 1;
    }
    table
};

impl AnswerStream {
    /// Takes canonical bytes from the front of `input` and appends answer bytes to `out` until
    /// `out` holds at least `cap` bytes (it may pass `cap` by one row's opening, at most 128
    /// bytes), `input` is used up, or [`Self::done`]. Returns how many bytes of `input` it took;
    /// the caller feeds the rest again later. While `out` is under `cap` and the answer is not
    /// done, it takes a byte or appends one.
    pub fn feed(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        cap: usize,
    ) -> Result<usize, FormatError> {
        if !self.started {
            self.begin(out);
        }
        if let Shape::Get = self.shape {
            let n = input.len().min(cap.saturating_sub(out.len()));
            out.extend_from_slice(&input[..n]);
            return Ok(n);
        }
        let mut i = 0;
        while i < input.len() && out.len() < cap && !self.done() {
            let b = input[i];
            if let Some(dim) = break_dimension(b) {
                if self.in_scroll {
                    self.end_scroll(out);
                    self.in_scroll = false;
                }
                if !self.at.advance(dim) {
                    return Err(FormatError::CoordinateTooLarge);
                }
                i += 1;
                continue;
            }
            let run_end = input[i..]
                .iter()
                .position(|&b| IS_BREAK[b as usize])
                .map_or(input.len(), |n| i + n);
            if !self.in_scroll {
                if self.listed_before_at(out) {
                    continue;
                }
                self.in_scroll = true;
                self.start_scroll(out);
            }
            let room = cap.saturating_sub(out.len()).max(1);
            i += self.text(&input[i..run_end], out, room);
        }
        Ok(i)
    }

    /// True when no byte still to come can change the answer: a query that has all its rows, or
    /// has passed its range and set. The caller may then stop reading and [`Self::finish`].
    pub fn done(&self) -> bool {
        match &self.shape {
            Shape::Query { set, next_set, range, limit, selected } => {
                !(self.in_scroll && *selected)
                    && (self.rows >= *limit
                        || (*next_set == set.len()
                            && range.is_none_or(|(from, to)| from > to || self.at > to)))
            }
            _ => false,
        }
    }

    /// Appends the answer's end, once every byte was fed (or [`Self::done`]), until `out` holds
    /// at least `cap` bytes. Returns true once the answer is complete; call it again while false.
    pub fn finish(&mut self, out: &mut Vec<u8>, cap: usize) -> bool {
        if self.complete {
            return true;
        }
        if !self.started {
            self.begin(out);
        }
        if self.in_scroll {
            self.end_scroll(out);
            self.in_scroll = false;
        }
        match &mut self.shape {
            Shape::Get => {}
            Shape::Toc { .. } => {
                if self.rows == 0 {
                    let _ = writeln!(out, "* {}: ", Coordinate::ORIGIN);
                }
            }
            Shape::Query { set, next_set, limit, .. } => {
                while *next_set < set.len() && self.rows < *limit {
                    if out.len() >= cap {
                        return false;
                    }
                    let c = set[*next_set];
                    *next_set += 1;
                    query_row_open(out, &mut self.rows, &c);
                    out.extend_from_slice(b"\"}");
                }
                out.push(b']');
            }
            Shape::JsonExport => {
                if self.rows == 0 {
                    json_export_row_open(out, &mut self.rows, &Coordinate::ORIGIN);
                    out.extend_from_slice(b"\" }\n");
                }
                out.extend_from_slice(b"]\n");
            }
        }
        self.complete = true;
        true
    }

    /// A query's next listed coordinate before the scroll starting at `at` holds nothing: writes
    /// its empty row and returns true, or returns false when there is none (or no room under the
    /// limit).
    fn listed_before_at(&mut self, out: &mut Vec<u8>) -> bool {
        let Shape::Query { set, next_set, limit, .. } = &mut self.shape else { return false };
        let Some(&c) = set.get(*next_set).filter(|c| **c < self.at) else { return false };
        if self.rows >= *limit {
            return false;
        }
        *next_set += 1;
        query_row_open(out, &mut self.rows, &c);
        out.extend_from_slice(b"\"}");
        true
    }

    fn begin(&mut self, out: &mut Vec<u8>) {
        self.started = true;
        match self.shape {
            Shape::Query { .. } => out.push(b'['),
            Shape::JsonExport => out.extend_from_slice(b"[\n"),
            Shape::Get | Shape::Toc { .. } => {}
        }
    }

    fn start_scroll(&mut self, out: &mut Vec<u8>) {
        let at = self.at;
        match &mut self.shape {
            Shape::Get => {}
            Shape::Toc { first_line } => {
                *first_line = true;
                self.rows += 1;
                let _ = write!(out, "* {at}: ");
            }
            Shape::Query { set, next_set, range, limit, selected } => {
                // Listed coordinates before this one were written by `listed_before_at`.
                let listed = set.get(*next_set) == Some(&at);
                if listed {
                    *next_set += 1;
                }
                let in_range = range.is_some_and(|(from, to)| from <= at && at <= to);
                *selected = (listed || in_range) && self.rows < *limit;
                if *selected {
                    query_row_open(out, &mut self.rows, &at);
                }
            }
            Shape::JsonExport => json_export_row_open(out, &mut self.rows, &at),
        }
    }

    fn end_scroll(&mut self, out: &mut Vec<u8>) {
        match &mut self.shape {
            Shape::Get => {}
            Shape::Toc { .. } => out.push(b'\n'),
            Shape::Query { selected, .. } => {
                if std::mem::take(selected) {
                    out.extend_from_slice(b"\"}");
                }
            }
            Shape::JsonExport => out.extend_from_slice(b"\" }\n"),
        }
    }

    /// Takes scroll text (no breaks) from the front of `run`, appending about `room` bytes of
    /// answer at most; returns how many bytes it took (at least one).
    fn text(&mut self, run: &[u8], out: &mut Vec<u8>, room: usize) -> usize {
        match &mut self.shape {
            Shape::Get => {
                let n = run.len().min(room);
                out.extend_from_slice(&run[..n]);
                n
            }
            Shape::Toc { first_line: false } => run.len(),
            Shape::Toc { first_line } => {
                let window = &run[..run.len().min(room)];
                match window.iter().position(|&b| b == b'\n') {
                    // The summary is the first line and `...` when more follows, as
                    // `ops::toc` writes it.
                    Some(nl) => {
                        out.extend_from_slice(&window[..nl]);
                        out.extend_from_slice(b"...");
                        *first_line = false;
                        nl + 1
                    }
                    None => {
                        out.extend_from_slice(window);
                        window.len()
                    }
                }
            }
            Shape::Query { selected: false, .. } => run.len(),
            Shape::Query { selected: true, .. } | Shape::JsonExport => json_escape(run, out, room),
        }
    }
}

/// Opens a query row (`{"coordinate":"<c>","scroll":"`), after a comma if it is not the first.
fn query_row_open(out: &mut Vec<u8>, rows: &mut u64, c: &Coordinate) {
    if *rows > 0 {
        out.push(b',');
    }
    *rows += 1;
    let _ = write!(out, "{{\"coordinate\":\"{c}\",\"scroll\":\"");
}

/// Opens a json-export row (`   { "coord": "<c>", "scroll": "`), after a comma if it is not the
/// first.
fn json_export_row_open(out: &mut Vec<u8>, rows: &mut u64, c: &Coordinate) {
    if *rows > 0 {
        out.push(b',');
    }
    *rows += 1;
    let _ = write!(out, "   {{ \"coord\": \"{c}\", \"scroll\": \"");
}

/// Appends `text` escaped as the contents of a JSON string, as serde_json escapes (quote,
/// backslash, and control characters: short forms for five, `\u00xx` for the rest), until about
/// `room` bytes were appended; returns how many bytes of `text` it took (at least one). Bytes
/// of multi-byte characters pass through unchanged, so a character split between two calls
/// comes out whole.
fn json_escape(text: &[u8], out: &mut Vec<u8>, room: usize) -> usize {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let start = out.len();
    let mut i = 0;
    while i < text.len() && out.len() - start < room {
        let plain = text[i..]
            .iter()
            .take(room - (out.len() - start))
            .position(|&b| b < 0x20 || b == b'"' || b == b'\\');
        let take = plain.unwrap_or_else(|| (text.len() - i).min(room - (out.len() - start)));
        out.extend_from_slice(&text[i..i + take]);
        i += take;
        if plain.is_none() {
            continue;
        }
        let b = text[i];
        i += 1;
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            _ => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[(b >> 4) as usize],
                HEX[(b & 0xf) as usize],
            ]),
        }
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn coord(rng: &mut rand::rngs::StdRng) -> Coordinate {
        let mut parts = [1u32; 9];
        for p in &mut parts {
            *p = if rng.gen_bool(0.7) { 1 } else { rng.gen_range(1..40) };
        }
        Coordinate::from_components(parts).unwrap()
    }

    fn text(rng: &mut rand::rngs::StdRng) -> String {
        let pieces =
            ["a", "\n", "\"", "\\", "\t", "\u{2}", "\u{7f}", "é", "line two", "\r", "\u{8}", "x"];
        (0..rng.gen_range(1..8)).map(|_| pieces[rng.gen_range(0..pieces.len())]).collect()
    }

    /// The most a piece may pass its cap by: one row's opening with a long coordinate.
    const SLACK: usize = 128;

    /// The whole answer from the canonical bytes fed in random pieces, with a random output cap.
    fn streamed(read: &OrderedRead, bytes: &[u8], rng: &mut rand::rngs::StdRng) -> Vec<u8> {
        let mut stream = read.stream();
        let mut answer = Vec::new();
        let mut at = 0;
        while at < bytes.len() && !stream.done() {
            let end = (at + rng.gen_range(1..12)).min(bytes.len());
            let mut piece = &bytes[at..end];
            while !piece.is_empty() && !stream.done() {
                let mut out = Vec::new();
                let cap = rng.gen_range(1..40);
                let took = stream.feed(piece, &mut out, cap).unwrap();
                assert!(took > 0 || !out.is_empty() || stream.done(), "no progress");
                assert!(
                    out.len() <= cap + SLACK,
                    "a piece of {} bytes for a cap of {cap}",
                    out.len()
                );
                answer.extend_from_slice(&out);
                piece = &piece[took..];
                at += took;
            }
        }
        loop {
            let mut out = Vec::new();
            let cap = rng.gen_range(1..40);
            let complete = stream.finish(&mut out, cap);
            assert!(out.len() <= cap + SLACK, "a piece of {} bytes for a cap of {cap}", out.len());
            answer.extend_from_slice(&out);
            if complete {
                return answer;
            }
        }
    }

    // Goal: every answer made from the canonical bytes in pieces (split anywhere, with any output
    // cap) equals the answer built whole from the document, and its announced length, for
    // random documents with escapes, multi-line scrolls and multi-byte characters, and random
    // query selectors and limits.
    #[test]
    fn streamed_answers_equal_built_answers() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(16);
        for round in 0..400 {
            let mut doc = Doc::new();
            for _ in 0..rng.gen_range(0..10) {
                doc.set(coord(&mut rng), text(&mut rng));
            }
            let bytes = doc.to_canonical();
            let mut set: Vec<Coordinate> =
                doc.iter().map(|(c, _)| *c).filter(|_| rng.gen_bool(0.4)).collect();
            for _ in 0..rng.gen_range(0..3) {
                set.push(coord(&mut rng));
            }
            set.sort();
            set.dedup();
            let (a, b) = (coord(&mut rng), coord(&mut rng));
            let range = rng.gen_bool(0.7).then_some((a.min(b), a.max(b)));
            let range = if rng.gen_bool(0.1) { Some((a.max(b), a.min(b))) } else { range };
            let limit = rng.gen_bool(0.3).then(|| rng.gen_range(0..4));
            let reads = [
                OrderedRead::Get,
                OrderedRead::Toc,
                OrderedRead::JsonExport,
                OrderedRead::Query { selector: Selector { range, set }, limit },
            ];
            for read in reads {
                let built = read.answer(&doc).body;
                assert_eq!(read.answer_len(&doc), built.len() as u64, "round {round}: {read:?}");
                let made = streamed(&read, &bytes, &mut rng);
                assert!(
                    made == built,
                    "round {round}: {read:?}\nstreamed {:?}\nbuilt    {:?}",
                    String::from_utf8_lossy(&made),
                    String::from_utf8_lossy(&built)
                );
            }
        }
    }

    // Goal: a scroll far larger than the output cap comes out in pieces near the cap, never in
    // one piece, for each read that copies or escapes its text.
    #[test]
    fn a_long_scroll_comes_out_in_capped_pieces() {
        let mut doc = Doc::new();
        doc.set(Coordinate::ORIGIN, "\"ab\n".repeat(10_000));
        let bytes = doc.to_canonical();
        let query = OrderedRead::Query {
            selector: Selector {
                range: Some((Coordinate::ORIGIN, Coordinate::ORIGIN)),
                set: vec![],
            },
            limit: None,
        };
        for read in [OrderedRead::Get, OrderedRead::JsonExport, query] {
            let mut stream = read.stream();
            let (mut rest, mut made) = (&bytes[..], Vec::new());
            while !rest.is_empty() {
                let mut out = Vec::new();
                let took = stream.feed(rest, &mut out, 1000).unwrap();
                assert!(out.len() <= 1000 + SLACK, "{read:?}: {} bytes", out.len());
                rest = &rest[took..];
                made.extend_from_slice(&out);
            }
            assert!(stream.finish(&mut made, usize::MAX));
            assert_eq!(made, read.answer(&doc).body, "{read:?}");
        }
    }
}
