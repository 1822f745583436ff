//! The read operations of the SQ API, on one document. Pure functions: the store calls them while
//! it holds the document, and the simulator's model calls them too.

use std::collections::BTreeMap;

use crate::coord::Coordinate;
use crate::coord::{break_dimension, DIMENSIONS};
use crate::doc::{checksum, write_canonical, Doc};
use crate::request::{Selector, WhereAlgo};

/// The text `delta` answers at a listed coordinate the document does not have.
pub const SCROLL_MISSING: &str = "---sq:Scroll-Missing---";

/// The largest answer a node builds in memory, in bytes: 16 MiB, the request body limit
/// ([`crate::request::BODY_BYTES_MAX`]), so a client can never make a node build more than it
/// could have sent itself. Every read's size is computed first ([`delta_len`], [`toc_len`],
/// [`query_len`], [`Doc::canonical_len`]); a `delta` over it is refused before anything is built
/// (its size grows with what the request lists: a few coordinates far from the origin cost a
/// megabyte of breaks each). A `get`, `toc`, `query` or `json-export` above it only re-presents
/// what the tenant stores (which its quota bounds), so it is not refused: it is made from the
/// document's file as that is read, a piece at a time ([`crate::streamed`]).
pub const ANSWER_BYTES_MAX: u64 = crate::request::BODY_BYTES_MAX as u64;

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

/// `checksum`: xxh3-128 of the canonical bytes, hashed as they are made, never built whole.
pub fn doc_checksum(doc: &Doc) -> String {
    doc.checksum()
}

/// `delta`: a phext of every scroll whose checksum differs from the manifest or that the manifest
/// lacks, plus [`SCROLL_MISSING`] at listed coordinates the document does not have.
///
/// Build it only after [`delta_len`] said its size: a few listed coordinates far from the origin
/// cost a megabyte of breaks each.
pub fn delta(doc: &Doc, manifest: &[(Coordinate, String)]) -> Vec<u8> {
    let listed = listed(manifest);
    let mut out = Vec::new();
    write_canonical(delta_scrolls(doc, &listed), &mut out);
    out
}

/// The length of [`delta`]'s answer, computed without building it: no allocation beyond the
/// manifest's own index.
pub fn delta_len(doc: &Doc, manifest: &[(Coordinate, String)]) -> u64 {
    let listed = listed(manifest);
    canonical_len_of(delta_scrolls(doc, &listed))
}

/// The manifest as a sorted index; a coordinate listed twice keeps its last checksum.
fn listed(manifest: &[(Coordinate, String)]) -> BTreeMap<Coordinate, &str> {
    manifest.iter().map(|(c, h)| (*c, h.as_str())).collect()
}

/// The scrolls of a delta in coordinate order: the document's scrolls that the manifest lacks or
/// lists with another checksum, merged with [`SCROLL_MISSING`] at listed coordinates the
/// document does not have.
fn delta_scrolls<'a>(
    doc: &'a Doc,
    listed: &'a BTreeMap<Coordinate, &'a str>,
) -> impl Iterator<Item = (&'a Coordinate, &'a str)> + 'a {
    let mut ours = doc.iter().peekable();
    let mut theirs = listed.keys().peekable();
    std::iter::from_fn(move || loop {
        let take_ours = match (ours.peek(), theirs.peek()) {
            (None, None) => return None,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some((a, _)), Some(b)) => *a <= *b,
        };
        if !take_ours {
            let c = theirs.next()?;
            return Some((c, SCROLL_MISSING));
        }
        let (c, text) = ours.next()?;
        if theirs.peek() == Some(&c) {
            theirs.next();
        }
        if listed.get(c).is_none_or(|h| *h != checksum(text.as_bytes())) {
            return Some((c, text));
        }
    })
}

/// The canonical length of scrolls given in coordinate order, as [`write_canonical`] writes them.
fn canonical_len_of<'a>(scrolls: impl Iterator<Item = (&'a Coordinate, &'a str)>) -> u64 {
    let mut at = Coordinate::ORIGIN;
    let mut len = 0u64;
    for (c, text) in scrolls.filter(|(_, t)| !t.is_empty()) {
        len += at.breaks_to(c) + text.len() as u64;
        at = *c;
    }
    len
}

/// Bytes of a coordinate's text form, `L.S.S/C.V.B/C.S.S`, without formatting it.
pub fn coordinate_text_len(c: &Coordinate) -> u64 {
    let digits = |mut v: u32| {
        let mut n = 1;
        while v >= 10 {
            v /= 10;
            n += 1;
        }
        n
    };
    // Eight separators between nine components.
    8 + c.components().iter().map(|&v| digits(v)).sum::<u64>()
}

/// The length of [`toc`]'s answer, computed without building it.
pub fn toc_len(doc: &Doc) -> u64 {
    // `* ` + coordinate + `: ` + summary + newline.
    let line = |c: &Coordinate, summary: u64| 5 + coordinate_text_len(c) + summary;
    if doc.is_empty() {
        return line(&Coordinate::ORIGIN, 0);
    }
    doc.iter().map(|(c, text)| line(c, summary_len(text))).sum()
}

/// The length of [`summary`] without building it.
fn summary_len(text: &str) -> u64 {
    match text.find('\n') {
        Some(first) => first as u64 + 3,
        None => text.len() as u64,
    }
}

/// The length of [`query`]'s answer, computed without building it or gathering its rows.
pub fn query_len(doc: &Doc, selector: &Selector, limit: Option<usize>) -> u64 {
    // `{"coordinate":"` + coordinate + `","scroll":"` + escaped scroll + `"}`.
    let row = |c: &Coordinate, s: &str| 29 + coordinate_text_len(c) + json_escaped_len(s);
    let (rows, bytes) = picked(doc, selector)
        .take(limit.unwrap_or(usize::MAX))
        .fold((0u64, 0u64), |(n, b), (c, s)| (n + 1, b + row(&c, s)));
    // Brackets, and a comma between rows.
    2 + bytes + rows.saturating_sub(1)
}

/// The scrolls a `query` answers before its limit, in coordinate order and once each: the
/// non-empty scrolls of the range merged with every coordinate of the set (sorted, as the parser
/// leaves it), which answers its scroll or empty text.
fn picked<'a>(
    doc: &'a Doc,
    selector: &'a Selector,
) -> impl Iterator<Item = (Coordinate, &'a str)> + 'a {
    let mut range = selector.range.iter().flat_map(|(from, to)| doc.range(*from, *to)).peekable();
    let mut set = selector.set.iter().peekable();
    std::iter::from_fn(move || {
        let from_set = match (range.peek().map(|(c, _)| **c), set.peek().map(|c| **c)) {
            (None, None) => return None,
            (Some(_), None) => false,
            (None, Some(_)) => true,
            (Some(a), Some(b)) => {
                if a == b {
                    set.next();
                }
                b < a
            }
        };
        if from_set {
            let c = set.next()?;
            Some((*c, doc.get(c)))
        } else {
            range.next().map(|(c, s)| (*c, s))
        }
    })
}

/// The length of `s` as a JSON string's contents, escaped as serde_json escapes: quote and
/// backslash, and control characters (short forms for five of them, `\u00XX` for the rest).
pub fn json_escaped_len(s: &str) -> u64 {
    s.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..0x20 => 6,
            _ => 1,
        })
        .sum()
}

/// `query`: scrolls as `[{"coordinate","scroll"}]` in coordinate order, at most `limit` of them:
/// the non-empty scrolls of the range and every coordinate of the set, once each.
pub fn query(doc: &Doc, selector: &Selector, limit: Option<usize>) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Row<'a> {
        coordinate: String,
        scroll: &'a str,
    }
    let rows: Vec<Row> = picked(doc, selector)
        .take(limit.unwrap_or(usize::MAX))
        .map(|(c, scroll)| Row { coordinate: c.to_string(), scroll })
        .collect();
    // Serialising strings and a derived struct into memory cannot fail.
    serde_json::to_vec(&rows).expect("query rows serialise")
}

/// `status`: the tenant's view of a document, in SQ's four lines. SQ names the file on the
/// server (`Hosting: data/notes.phext`) and its connection counter; this names the document in
/// the tenant's namespace and answers connection 0, as SQ's multi-tenant mode does. An empty
/// document counts one (empty) scroll, as SQ counts it after reading an empty file.
pub fn status(name: &str, doc: &Doc) -> String {
    format!(
        "Hosting: {name}.phext\nConnection ID: 0\nPhext Size: {}\nScrolls: {}",
        doc.canonical_len(),
        doc.scroll_count().max(1)
    )
}

/// `load`: SQ answers with the file it read; this names the document.
pub fn loaded(name: &str) -> String {
    format!("Loaded {name}.phext")
}

/// `json-export`: SQ's JSON lines, one object per scroll in coordinate order (SQ's order is its
/// hash map's). An empty document exports its origin, empty, as SQ does. Strings are escaped
/// as JSON requires; SQ escapes only `"` and newlines, so its export of a scroll holding a
/// backslash or a control character is not JSON, while this one is, and equal to SQ's otherwise.
pub fn json_export(doc: &Doc) -> String {
    let mut out = String::from("[\n");
    let row = |out: &mut String, c: &Coordinate, text: &str| {
        // Serialising a string cannot fail.
        let text = serde_json::to_string(text).expect("a string serialises");
        out.push_str(&format!("   {{ \"coord\": \"{c}\", \"scroll\": {text} }}\n"));
    };
    if doc.is_empty() {
        row(&mut out, &Coordinate::ORIGIN, "");
    }
    for (i, (c, text)) in doc.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        row(&mut out, c, text);
    }
    out.push_str("]\n");
    out
}

/// The length of [`json_export`]'s answer, computed without building it.
pub fn json_export_len(doc: &Doc) -> u64 {
    // `   { "coord": "` + coordinate + `", "scroll": "` + escaped scroll + `" }` and a newline.
    let row = |c: &Coordinate, s: &str| 33 + coordinate_text_len(c) + json_escaped_len(s);
    let rows = if doc.is_empty() {
        row(&Coordinate::ORIGIN, "")
    } else {
        doc.iter().map(|(c, s)| row(c, s)).sum::<u64>() + doc.scroll_count() as u64 - 1
    };
    // `[` and `]`, each on its own line.
    4 + rows
}

/// `where`: the coordinate SQ 0.6.0 infers for a text, in SQ's words. The components are
/// printed as computed, zeros included (an XOR of equal coordinates is 0.0.0/0.0.0/0.0.0).
pub fn where_(text: &str, algo: WhereAlgo, limit: usize) -> String {
    let (parts, name) = match algo {
        WhereAlgo::Xor => (xor_of_scrolls(text, limit), "xor"),
        WhereAlgo::Checksum => (checksum_components(text), "checksum"),
    };
    let p = parts;
    format!(
        "Calculated coordinate {}.{}.{}/{}.{}.{}/{}.{}.{} for input (algo={name}, limit={limit}).",
        p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8]
    )
}

/// The largest component libphext reaches when it reads breaks: it stops counting at 999.
const LIBPHEXT_COMPONENT_CAP: u64 = 999;

/// The origin XOR the coordinate of every scroll of `text` at least `limit` bytes long, the
/// scrolls found as libphext's phokenize finds them (breaks before any text are skipped; each
/// scroll sits where its text begins; a dimension stops counting at 999).
fn xor_of_scrolls(text: &str, limit: usize) -> [u64; DIMENSIONS] {
    let bytes = text.as_bytes();
    let mut out = [1u64; DIMENSIONS];
    let mut at = [1u64; DIMENSIONS];
    let mut i = 0;
    loop {
        // One scroll: skip breaks before its text, take its text, consume the break after it.
        let (mut begin, mut len, mut has_text) = (at, 0usize, false);
        while i < bytes.len() {
            let b = bytes[i];
            i += 1;
            if let Some(d) = break_dimension(b) {
                if at[d] < LIBPHEXT_COMPONENT_CAP {
                    at[d] += 1;
                }
                at[d + 1..].iter_mut().for_each(|x| *x = 1);
                if has_text {
                    break;
                }
            } else {
                if !has_text {
                    (has_text, begin) = (true, at);
                }
                len += 1;
            }
        }
        if len >= limit {
            out.iter_mut().zip(begin).for_each(|(o, b)| *o ^= b);
        }
        if i >= bytes.len() {
            return out;
        }
    }
}

/// SQ's checksum coordinate: from the 32 hex digits of the text's xxh3-128, each component is
/// two digits' bytes read as a big-endian 16-bit number, modulo 999, with 0 read as 1.
fn checksum_components(text: &str) -> [u64; DIMENSIONS] {
    let hex = checksum(text.as_bytes());
    let b = hex.as_bytes();
    let mut out = [1u64; DIMENSIONS];
    for (i, part) in out.iter_mut().enumerate() {
        let value = (u64::from(b[2 * i]) << 8 | u64::from(b[2 * i + 1])) % LIBPHEXT_COMPONENT_CAP;
        *part = value.max(1);
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coord::sq_reading;
    use rand::{Rng, SeedableRng};

    fn components(c: &libphext::phext::Coordinate) -> [u64; DIMENSIONS] {
        [
            c.z.library,
            c.z.shelf,
            c.z.series,
            c.y.collection,
            c.y.volume,
            c.y.book,
            c.x.chapter,
            c.x.section,
            c.x.scroll,
        ]
        .map(|v| v as u64)
    }

    /// A random text of fewer than `max` pieces from `alphabet`.
    fn text(rng: &mut rand::rngs::StdRng, alphabet: &[&str], max: usize) -> String {
        let n = rng.gen_range(0..max);
        (0..n).map(|_| alphabet[rng.gen_range(0..alphabet.len())]).collect()
    }

    // Goal: SQ's reading of a coordinate text and its XOR placement of a text are libphext's
    // (the reference SQ is built on), for seeded random texts of digits, separators, letters,
    // spaces and dimension breaks.
    #[test]
    fn sq_readings_match_libphext() {
        // Fewer than ten one-digit pieces: every number fits SQ's 32 bits, where libphext 0.4
        // (the version at hand) and 0.3.3 (SQ's) agree.
        let coords = ["1", "2", "7", "0", ".", "/", ";", "a", " ", "-"];
        let texts = ["a", "bc", "\n", "é", "\u{17}", "\u{18}", "\u{1}", "\u{1f}", "\u{1a}"];
        for seed in 0..200u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let c = text(&mut rng, &coords, 10);
            let want = components(&libphext::phext::to_coordinate(&c));
            assert_eq!(sq_reading(&c), want, "{c:?}");
            let t = text(&mut rng, &texts, 24);
            let limit = rng.gen_range(0..4);
            let mut want = [1u64; DIMENSIONS];
            for phoken in libphext::phext::phokenize(&t) {
                if phoken.scroll.len() >= limit {
                    let at = components(&phoken.coord);
                    want.iter_mut().zip(at).for_each(|(w, a)| *w ^= a);
                }
            }
            assert_eq!(xor_of_scrolls(&t, limit), want, "{t:?} limit {limit}");
        }
    }

    // Goal: `where`, `status` and `json-export` answer in SQ's exact words (checked against
    // answers recorded from SQ 0.6.0 in tests/fixtures/sq06).
    #[test]
    fn answers_in_sq_words() {
        assert_eq!(
            where_("some text", WhereAlgo::Checksum, 100),
            "Calculated coordinate 958.126.167/357.723.450/607.673.427 for input (algo=checksum, limit=100)."
        );
        assert_eq!(
            where_(&"x".repeat(100), WhereAlgo::Xor, 100),
            "Calculated coordinate 0.0.0/0.0.0/0.0.0 for input (algo=xor, limit=100)."
        );
        let empty = Doc::new();
        assert_eq!(
            json_export(&empty),
            "[\n   { \"coord\": \"1.1.1/1.1.1/1.1.1\", \"scroll\": \"\" }\n]\n"
        );
        assert_eq!(
            status("", &empty),
            "Hosting: .phext\nConnection ID: 0\nPhext Size: 0\nScrolls: 1"
        );
    }

    fn len_coord(rng: &mut rand::rngs::StdRng) -> Coordinate {
        let mut parts = [1u32; 9];
        for p in &mut parts {
            *p = if rng.gen_bool(0.6) { 1 } else { rng.gen_range(1..2_000) };
        }
        Coordinate::from_components(parts).unwrap()
    }

    fn len_text(rng: &mut rand::rngs::StdRng) -> String {
        let pieces = ["a", "\n", "\"", "\\", "\t", "\u{2}", "\u{7f}", "é", "line two", "\r"];
        (0..rng.gen_range(1..6)).map(|_| pieces[rng.gen_range(0..pieces.len())]).collect()
    }

    // Goal: every size computed before an answer is built equals the length of the answer built,
    // for random documents, manifests and selectors, including escapes and summaries.
    #[test]
    fn answer_lengths_match_answers() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        for _ in 0..300 {
            let mut doc = Doc::new();
            for _ in 0..rng.gen_range(0..12) {
                doc.set(len_coord(&mut rng), len_text(&mut rng));
            }
            let mut manifest: Vec<(Coordinate, String)> = Vec::new();
            for (c, t) in doc.iter() {
                match rng.gen_range(0..3) {
                    0 => {}
                    1 => manifest.push((*c, checksum(t.as_bytes()))),
                    _ => manifest.push((*c, "00".into())),
                }
            }
            for _ in 0..rng.gen_range(0..4) {
                manifest.push((len_coord(&mut rng), "00".into()));
            }
            assert_eq!(delta_len(&doc, &manifest), delta(&doc, &manifest).len() as u64);
            assert_eq!(toc_len(&doc), toc(&doc).len() as u64);
            assert_eq!(json_export_len(&doc), json_export(&doc).len() as u64);
            let (a, b) = (len_coord(&mut rng), len_coord(&mut rng));
            let mut set: Vec<Coordinate> =
                doc.iter().map(|(c, _)| *c).filter(|_| rng.gen_bool(0.5)).collect();
            set.push(a);
            set.sort();
            set.dedup();
            let limit = rng.gen_bool(0.3).then(|| rng.gen_range(0..4));
            let both = Selector { range: Some((a, b)), set: set.clone() };
            for selector in [
                Selector { range: Some((a, b)), set: Vec::new() },
                Selector { range: None, set },
                both,
            ] {
                let built = query(&doc, &selector, limit).len() as u64;
                assert_eq!(query_len(&doc, &selector, limit), built, "{selector:?}");
            }
        }
    }

    // Goal: the manifest of the hostile probe (a few lines far from the origin, against an absent
    // document) is sized at megabytes per line without building anything.
    #[test]
    fn far_coordinates_are_sized_not_built() {
        let manifest: Vec<(Coordinate, String)> = (1..=200)
            .map(|k| {
                (Coordinate::parse(&format!("1.1.{k}/1.1.1/1.1.1000000")).unwrap(), "00".into())
            })
            .collect();
        let len = delta_len(&Doc::new(), &manifest);
        assert!(len > 200 * 999_999, "{len}");
        assert!(len > ANSWER_BYTES_MAX);
    }
}
