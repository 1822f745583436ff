//! One phext document held as its scrolls, with the canonical (libphext) serialisation.
//!
//! A document is a sorted map from coordinate to non-empty scroll text. Its canonical bytes are
//! the scrolls in coordinate order, each preceded by the breaks that lead to it from the one
//! before (from `1.1.1/1.1.1/1.1.1` for the first). Empty scrolls are not kept: they serialise to
//! nothing, which is also how libphext drops empty trailing scrolls.
//!
//! The canonical length is kept up to date on every change in O(log n), so a write never has to
//! serialise the document to learn what it will cost against a quota.

use std::collections::BTreeMap;

use crate::coord::{break_dimension, Coordinate, BREAKS};

/// Bytes a scroll may never contain: the nine dimension breaks. Stored inside a scroll they would
/// re-address every later scroll when the document is read back, so text carrying them is refused.
pub fn contains_break(text: &str) -> bool {
    text.bytes().any(|b| BREAKS.contains(&b))
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("document is not valid UTF-8")]
    NotUtf8,
    #[error("document addresses a coordinate past the component limit")]
    CoordinateTooLarge,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Doc {
    scrolls: BTreeMap<Coordinate, String>,
    canonical_len: u64,
}

impl Doc {
    pub fn new() -> Doc {
        Doc::default()
    }

    /// Length in bytes of [`Doc::to_canonical`], without building it.
    pub fn canonical_len(&self) -> u64 {
        self.canonical_len
    }

    pub fn scroll_count(&self) -> usize {
        self.scrolls.len()
    }

    pub fn is_empty(&self) -> bool {
        self.scrolls.is_empty()
    }

    /// The scroll at `c`; empty when absent.
    pub fn get(&self, c: &Coordinate) -> &str {
        self.scrolls.get(c).map(String::as_str).unwrap_or("")
    }

    /// Scrolls in coordinate order.
    pub fn iter(&self) -> impl Iterator<Item = (&Coordinate, &str)> {
        self.scrolls.iter().map(|(c, s)| (c, s.as_str()))
    }

    /// Scrolls from `from` to `to`, both inclusive, in coordinate order.
    pub fn range(
        &self,
        from: Coordinate,
        to: Coordinate,
    ) -> impl Iterator<Item = (&Coordinate, &str)> {
        let bounds = if from <= to { from..=to } else { from..=from };
        let empty = from > to;
        self.scrolls.range(bounds).filter(move |_| !empty).map(|(c, s)| (c, s.as_str()))
    }

    /// The canonical length this document would have if the scroll at `c` held `new_len` bytes.
    pub fn canonical_len_after(&self, c: &Coordinate, new_len: usize) -> u64 {
        let old_len = self.scrolls.get(c).map_or(0, String::len) as u64;
        let structure = self.structure_cost(c);
        let without = self.canonical_len - if old_len > 0 { old_len + structure } else { 0 };
        without + if new_len > 0 { new_len as u64 + structure } else { 0 }
    }

    /// Replaces the scroll at `c`; empty text removes it. Returns the bytes it held before.
    pub fn set(&mut self, c: Coordinate, text: String) -> usize {
        assert!(!contains_break(&text), "scroll text must be checked for breaks before set");
        self.canonical_len = self.canonical_len_after(&c, text.len());
        let old =
            if text.is_empty() { self.scrolls.remove(&c) } else { self.scrolls.insert(c, text) };
        old.map_or(0, |s| s.len())
    }

    /// Appends `text` to the scroll at `c`.
    pub fn append(&mut self, c: Coordinate, text: &str) {
        assert!(!contains_break(text), "scroll text must be checked for breaks before append");
        if text.is_empty() {
            return;
        }
        let old_len = self.scrolls.get(&c).map_or(0, String::len);
        self.canonical_len = self.canonical_len_after(&c, old_len + text.len());
        self.scrolls.entry(c).or_default().push_str(text);
    }

    /// Cuts the scroll at `c` to its first `len` bytes (kept on a character boundary), then
    /// appends `text`. Used by log replay: applying it twice gives the same scroll.
    pub fn truncate_append(&mut self, c: Coordinate, len: usize, text: &str) {
        let mut scroll = self.scrolls.get(&c).cloned().unwrap_or_default();
        let mut keep = len.min(scroll.len());
        while !scroll.is_char_boundary(keep) {
            keep -= 1;
        }
        scroll.truncate(keep);
        scroll.push_str(text);
        self.set(c, scroll);
    }

    /// Break bytes that a non-empty scroll at `c` adds to the document: the breaks leading to it,
    /// plus whatever it changes in the breaks leading on to the next scroll.
    fn structure_cost(&self, c: &Coordinate) -> u64 {
        let prev = self.scrolls.range(..*c).next_back().map_or(Coordinate::ORIGIN, |(p, _)| *p);
        let next =
            self.scrolls.range((std::ops::Bound::Excluded(*c), std::ops::Bound::Unbounded)).next();
        let lead_in = prev.breaks_to(c);
        match next {
            None => lead_in,
            Some((n, _)) => lead_in + c.breaks_to(n) - prev.breaks_to(n),
        }
    }

    /// The canonical libphext bytes of the document.
    pub fn to_canonical(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.canonical_len as usize);
        write_canonical(self.iter(), &mut out);
        debug_assert_eq!(out.len() as u64, self.canonical_len, "canonical length drifted");
        out
    }

    /// Hands the canonical bytes to `out` in order, a piece at a time (the breaks leading to a
    /// scroll, then its text), so they can be written out without building the whole document.
    /// Stops at the first error `out` returns.
    pub fn write_canonical_pieces<E>(
        &self,
        mut out: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut at = Coordinate::ORIGIN;
        let mut breaks = Vec::new();
        for (c, text) in self.iter() {
            breaks.clear();
            at.write_breaks_to(c, &mut breaks);
            out(&breaks)?;
            out(text.as_bytes())?;
            at = *c;
        }
        Ok(())
    }

    /// [`checksum`] of [`Doc::to_canonical`], hashed as the canonical bytes are handed over a
    /// piece at a time ([`Doc::write_canonical_pieces`]): no copy of the document is built.
    pub fn checksum(&self) -> String {
        let mut sum = Checksum::new();
        let hashed: Result<(), std::convert::Infallible> = self.write_canonical_pieces(|piece| {
            sum.update(piece);
            Ok(())
        });
        let Ok(()) = hashed;
        sum.finish()
    }

    /// Reads a phext document. Any phext is accepted; text at the same coordinate is joined, and
    /// empty scrolls vanish, so the result is canonical.
    pub fn parse(bytes: &[u8]) -> Result<Doc, FormatError> {
        let text = std::str::from_utf8(bytes).map_err(|_| FormatError::NotUtf8)?;
        let mut doc = Doc::new();
        let mut at = Coordinate::ORIGIN;
        let mut run_start = 0;
        for (i, b) in text.bytes().enumerate() {
            if let Some(dim) = break_dimension(b) {
                // Breaks are ASCII, so `run_start..i` falls on character boundaries.
                doc.append(at, &text[run_start..i]);
                if !at.advance(dim) {
                    return Err(FormatError::CoordinateTooLarge);
                }
                run_start = i + 1;
            }
        }
        doc.append(at, &text[run_start..]);
        Ok(doc)
    }
}

/// Writes scrolls, given in coordinate order, as canonical phext. Empty scrolls write nothing.
pub fn write_canonical<'a>(
    scrolls: impl Iterator<Item = (&'a Coordinate, &'a str)>,
    out: &mut Vec<u8>,
) {
    let mut at = Coordinate::ORIGIN;
    for (c, text) in scrolls {
        if text.is_empty() {
            continue;
        }
        assert!(at <= *c, "scrolls must come in coordinate order");
        at.write_breaks_to(c, out);
        out.extend_from_slice(text.as_bytes());
        at = *c;
    }
}

/// The SQ checksum: xxh3-128 of the bytes as 32 lowercase hex digits.
pub fn checksum(bytes: &[u8]) -> String {
    Checksum::digits(xxhash_rust::xxh3::xxh3_128(bytes))
}

/// [`checksum`] of bytes that arrive in pieces, split anywhere: the same digits, with only the
/// hash's state held (a few hundred bytes), whatever the bytes' length.
pub struct Checksum(xxhash_rust::xxh3::Xxh3);

impl Checksum {
    pub fn new() -> Checksum {
        Checksum(xxhash_rust::xxh3::Xxh3::new())
    }

    pub fn update(&mut self, piece: &[u8]) {
        self.0.update(piece);
    }

    /// The checksum of every piece given so far, in order.
    pub fn finish(&self) -> String {
        Checksum::digits(self.0.digest128())
    }

    fn digits(hash: u128) -> String {
        format!("{hash:032x}")
    }
}

impl Default for Checksum {
    fn default() -> Checksum {
        Checksum::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_coord(rng: &mut rand::rngs::StdRng) -> Coordinate {
        let mut parts = [1u32; 9];
        for p in &mut parts {
            // Mostly 1s, so neighbours share prefixes as real documents do.
            *p = if rng.gen_bool(0.7) { 1 } else { rng.gen_range(1..5) };
        }
        Coordinate::from_components(parts).unwrap()
    }

    fn to_libphext(c: &Coordinate) -> libphext::phext::Coordinate {
        libphext::phext::to_coordinate(&c.to_string())
    }

    // Goal: after any sequence of edits, our canonical bytes, length and checksum equal what
    // libphext produces from the same scrolls, and parsing our bytes gives the same document back.
    #[test]
    fn matches_libphext_under_random_edits() {
        for seed in 0..40u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut doc = Doc::new();
            let mut model = std::collections::HashMap::new();
            for _ in 0..60 {
                let c = random_coord(&mut rng);
                let text: String = match rng.gen_range(0..4) {
                    0 => String::new(),
                    1 => "line\nnext".into(),
                    2 => "héllo ✓".into(),
                    _ => format!("s{}", rng.gen_range(0..1000)),
                };
                if rng.gen_bool(0.3) {
                    doc.append(c, &text);
                    if !text.is_empty() {
                        model.entry(to_libphext(&c)).or_insert_with(String::new).push_str(&text);
                    }
                } else {
                    doc.set(c, text.clone());
                    // SQ serialises only non-empty scrolls (libphext's implode would let an empty
                    // one shift the breaks of the next), so the model drops them too.
                    if text.is_empty() {
                        model.remove(&to_libphext(&c));
                    } else {
                        model.insert(to_libphext(&c), text);
                    }
                }
                let ours = doc.to_canonical();
                let theirs = libphext::phext::implode(model.clone());
                assert_eq!(ours, theirs.as_bytes(), "seed {seed}");
                assert_eq!(doc.canonical_len(), ours.len() as u64);
                assert_eq!(checksum(&ours), libphext::phext::checksum(&theirs));
                assert_eq!(doc.checksum(), libphext::phext::checksum(&theirs), "seed {seed}");
                assert_eq!(Doc::parse(&ours).unwrap(), doc, "seed {seed}");
            }
        }
    }

    // Goal: the recorded SQ checksum of an empty document is reproduced, whole and streamed.
    #[test]
    fn empty_checksum() {
        assert_eq!(checksum(b""), "99aa06d3014798d86001c324468d497f");
        assert_eq!(Doc::new().checksum(), "99aa06d3014798d86001c324468d497f");
    }

    // Goal: bytes hashed in pieces split anywhere (on either side of xxh3's 240-byte short
    // input and its 1,024-byte stripes) give exactly the checksum of the bytes whole; and a
    // document's streamed checksum of large scrolls (past those sizes) equals the whole one.
    #[test]
    fn checksum_in_pieces_equals_checksum_whole() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for len in [0usize, 1, 17, 239, 240, 241, 1023, 1024, 1025, 5000, 70_000] {
            let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            for _ in 0..8 {
                let mut sum = Checksum::new();
                let mut rest = &bytes[..];
                while !rest.is_empty() {
                    let n = rng.gen_range(1..=rest.len().min(3000));
                    sum.update(&rest[..n]);
                    rest = &rest[n..];
                }
                assert_eq!(sum.finish(), checksum(&bytes), "{len} bytes");
            }
        }
        let mut doc = Doc::new();
        for k in 1..=5u32 {
            let c = Coordinate::from_components([1, 1, 1, 1, 1, 1, 1, k, 1]).unwrap();
            doc.set(c, "x".repeat(997 * k as usize));
        }
        assert_eq!(doc.checksum(), checksum(&doc.to_canonical()));
    }

    // Goal: replaying a truncate-append on a scroll that already has it changes nothing.
    #[test]
    fn truncate_append_is_idempotent() {
        let c = Coordinate::ORIGIN;
        let mut doc = Doc::new();
        doc.truncate_append(c, 0, "ab");
        doc.truncate_append(c, 2, "cd");
        let once = doc.clone();
        doc.truncate_append(c, 2, "cd");
        assert_eq!(doc, once);
        assert_eq!(doc.get(&c), "abcd");
    }

    // Goal: a document whose breaks run past the coordinate limit is refused, not wrapped.
    #[test]
    fn parse_refuses_runaway_breaks() {
        let bytes = vec![0x17u8; crate::coord::COORDINATE_COMPONENT_MAX as usize];
        assert_eq!(Doc::parse(&bytes), Err(FormatError::CoordinateTooLarge));
        assert_eq!(Doc::parse(&[0xff, 0xfe]), Err(FormatError::NotUtf8));
    }
}
