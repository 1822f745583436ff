//! The read operations of the SQ API, on one document. Pure functions: the store calls them while
//! it holds the document, and the simulator's model calls them too.

use crate::coord::Coordinate;
use crate::doc::{checksum, write_canonical, Doc};
use crate::request::Selector;

/// The text `delta` answers at a listed coordinate the document does not have.
pub const SCROLL_MISSING: &str = "---sq:Scroll-Missing---";

/// `toc`: a line `* <coord>: <summary>` per scroll; an empty document lists the origin, empty.
pub fn toc(doc: &Doc) -> String {
    let mut out = String::new();
    if doc.is_empty() {
        out.push_str(&format!("* {}: \n", Coordinate::ORIGIN));
    }
    for (c, text) in doc.iter() {
        out.push_str(&format!("* {c}: {}\n", summary(text)));
    }
    out
}

/// The first line of a scroll, with `...` when more follows (libphext's summary).
fn summary(text: &str) -> String {
    let first = text.split('\n').next().unwrap_or("");
    if first.len() < text.len() {
        format!("{first}...")
    } else {
        first.to_string()
    }
}

/// `checksum`: xxh3-128 of the canonical bytes.
pub fn doc_checksum(doc: &Doc) -> String {
    checksum(&doc.to_canonical())
}

/// `delta`: a phext of every scroll whose checksum differs from the manifest or that the manifest
/// lacks, plus [`SCROLL_MISSING`] at listed coordinates the document does not have.
pub fn delta(doc: &Doc, manifest: &[(Coordinate, String)]) -> Vec<u8> {
    let listed: std::collections::BTreeMap<Coordinate, &str> =
        manifest.iter().map(|(c, h)| (*c, h.as_str())).collect();
    let mut out_scrolls: std::collections::BTreeMap<Coordinate, &str> =
        std::collections::BTreeMap::new();
    for (c, text) in doc.iter() {
        if listed.get(c).is_none_or(|h| *h != checksum(text.as_bytes())) {
            out_scrolls.insert(*c, text);
        }
    }
    for c in listed.keys() {
        if doc.get(c).is_empty() {
            out_scrolls.insert(*c, SCROLL_MISSING);
        }
    }
    let mut out = Vec::new();
    write_canonical(out_scrolls.iter().map(|(c, t)| (c, *t)), &mut out);
    out
}

/// `query`: scrolls as `[{"coordinate","scroll"}]` in coordinate order, at most `limit` of them.
pub fn query(doc: &Doc, selector: &Selector, limit: Option<usize>) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Row<'a> {
        coordinate: String,
        scroll: &'a str,
    }
    let limit = limit.unwrap_or(usize::MAX);
    let rows: Vec<Row> = match selector {
        Selector::Range { from, to } => doc
            .range(*from, *to)
            .take(limit)
            .map(|(c, s)| Row { coordinate: c.to_string(), scroll: s })
            .collect(),
        Selector::Set(coords) => coords
            .iter()
            .take(limit)
            .map(|c| Row { coordinate: c.to_string(), scroll: doc.get(c) })
            .collect(),
    };
    // Serialising strings and a derived struct into memory cannot fail.
    serde_json::to_vec(&rows).expect("query rows serialise")
}

/// The answer to a write, as SQ words it.
pub fn inserted(n: usize) -> String {
    format!("Inserted {n} bytes")
}
pub fn updated(n: usize) -> String {
    format!("Updated {n} bytes")
}
pub fn removed(n: usize) -> String {
    format!("Removed {n} bytes")
}
