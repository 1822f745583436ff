//! Phext coordinates: nine positive integers, `L.S.S/C.V.B/C.S.S`.
//!
//! Parsing follows SQ 0.6.0 where SQ is well defined and refuses where SQ silently corrupts.
//! Accepted as SQ reads them: `;` or `/` or `.` between parts, whitespace around the text, an
//! empty text (the origin), and short coordinates (`42.1.1/11.1.1`: the parts fill from the
//! library down, and the last one is the scroll, as libphext's `to_coordinate` reads them).
//! Refused, with what SQ would have done: letters or spaces inside (SQ skips them), empty parts,
//! more than nine parts, and zero components (SQ stores them and its next reload moves the text).

use std::fmt;

use serde::{Deserialize, Serialize};

/// The largest value any one component may take.
///
/// A coordinate costs break bytes in the canonical document: `1.1.1/1.1.1/1.1.N` is preceded by
/// N-1 scroll breaks. The cap keeps one request from asking for gigabytes of breaks; quota still
/// counts every break byte below it.
pub const COORDINATE_COMPONENT_MAX: u32 = 1_000_000;

/// The number of dimensions a coordinate names, from library (index 0) down to scroll (index 8).
pub const DIMENSIONS: usize = 9;

/// Break bytes by dimension, library (index 0) down to scroll (index 8), as libphext writes them.
pub const BREAKS: [u8; DIMENSIONS] = [0x01, 0x1F, 0x1E, 0x1D, 0x1C, 0x1A, 0x19, 0x18, 0x17];

/// Where a break byte sits in [`BREAKS`], or `None` for any other byte.
pub fn break_dimension(byte: u8) -> Option<usize> {
    BREAKS.iter().position(|&b| b == byte)
}

/// A phext coordinate. Ordered as libphext orders them: library first, scroll last.
///
/// Decoding checks the same bounds as parsing, so a coordinate from the wire or the disk is as
/// trustworthy as one typed by a client.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(try_from = "[u32; DIMENSIONS]", into = "[u32; DIMENSIONS]")]
pub struct Coordinate([u32; DIMENSIONS]);

impl TryFrom<[u32; DIMENSIONS]> for Coordinate {
    type Error = CoordError;
    fn try_from(parts: [u32; DIMENSIONS]) -> Result<Coordinate, CoordError> {
        Coordinate::from_components(parts)
    }
}

impl From<Coordinate> for [u32; DIMENSIONS] {
    fn from(c: Coordinate) -> [u32; DIMENSIONS] {
        c.0
    }
}

/// The largest component SQ 0.6.0 keeps: libphext 0.3.3 stops counting breaks of a dimension at
/// 999 when it reads a document, so SQ moves a scroll written at `2026.2.22/…` to `999.2.22/…` on
/// its next reload. Writes above it are refused (see [`Coordinate::above_sq_range`]).
pub const SQ_COMPONENT_MAX: u32 = 999;

/// The separators SQ accepts between the parts of a coordinate (libphext's micro and macro
/// breaks, and `;`, its URL-safe stand-in for `/`).
const SEPARATORS: [char; 3] = ['.', '/', ';'];

/// The canonical form, as refusals name it.
pub const CANONICAL_FORM: &str =
    "L.S.S/C.V.B/C.S.S, nine positive integers such as 1.1.1/1.1.1/1.1.1 (a short form fills from the library down and its last number is the scroll)";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoordError {
    #[error("invalid coordinate {0:?}: write {CANONICAL_FORM}; {sq}", sq = sq_would(.0))]
    Malformed(String),
    #[error("invalid coordinate {0:?}: components start at 1; {sq}", sq = sq_would(.0))]
    Zero(String),
    #[error("invalid coordinate {0:?}: a component exceeds {COORDINATE_COMPONENT_MAX}; {sq}", sq = sq_would(.0))]
    TooLarge(String),
}

/// How SQ 0.6.0 reads a coordinate text (libphext 0.3.3's `to_coordinate`): bytes other than
/// digits and separators are skipped; each separator ends a part, filling the components from the
/// library down; the number after the last separator is the scroll; components never named are
/// 1; a part's value wraps at 2^32 as SQ's release build does.
pub fn sq_reading(text: &str) -> [u64; DIMENSIONS] {
    let mut parts = [1u64; DIMENSIONS];
    let mut index = 0usize;
    let mut value: u32 = 0;
    for b in text.bytes() {
        if SEPARATORS.contains(&(b as char)) {
            if (1..DIMENSIONS).contains(&index) {
                parts[index - 1] = u64::from(value);
                index += 1;
            }
            value = 0;
        }
        if b.is_ascii_digit() {
            value = value.wrapping_mul(10).wrapping_add(u32::from(b - b'0'));
            if index == 0 {
                index = 1;
            }
        }
    }
    if index > 0 {
        parts[DIMENSIONS - 1] = u64::from(value);
    }
    parts
}

/// What SQ 0.6.0 would have done with a coordinate this service refuses, as a refusal says it.
pub fn sq_would(text: &str) -> String {
    let parts = sq_reading(text);
    let shown = parts.map(|p| p.to_string());
    let shown = format!(
        "{}.{}.{}/{}.{}.{}/{}.{}.{}",
        shown[0], shown[1], shown[2], shown[3], shown[4], shown[5], shown[6], shown[7], shown[8]
    );
    if parts.contains(&0) {
        format!("SQ 0.6.0 would read it as {shown}, which is not a coordinate, and its next reload would fold the text into another scroll")
    } else if parts.iter().any(|&p| p > u64::from(SQ_COMPONENT_MAX)) {
        let clamped = parts.map(|p| p.min(u64::from(SQ_COMPONENT_MAX)).to_string());
        format!(
            "SQ 0.6.0 would read it as {shown} and its next reload would move the text to {}.{}.{}/{}.{}.{}/{}.{}.{}",
            clamped[0], clamped[1], clamped[2], clamped[3], clamped[4], clamped[5], clamped[6], clamped[7], clamped[8]
        )
    } else {
        format!("SQ 0.6.0 would skip what is not a number and use {shown}")
    }
}

impl Coordinate {
    /// `1.1.1/1.1.1/1.1.1`, where every document starts.
    pub const ORIGIN: Coordinate = Coordinate([1; DIMENSIONS]);

    /// Builds a coordinate from its nine components, checking the same bounds as [`parse`].
    ///
    /// [`parse`]: Coordinate::parse
    pub fn from_components(parts: [u32; DIMENSIONS]) -> Result<Coordinate, CoordError> {
        let c = Coordinate(parts);
        if parts.contains(&0) {
            return Err(CoordError::Zero(c.to_string()));
        }
        if parts.iter().any(|&p| p > COORDINATE_COMPONENT_MAX) {
            return Err(CoordError::TooLarge(c.to_string()));
        }
        Ok(c)
    }

    pub fn components(&self) -> [u32; DIMENSIONS] {
        self.0
    }

    /// Parses a coordinate as SQ reads it (see the module's rules): whitespace around is
    /// trimmed, an empty text is the origin, one to nine parts of digits separated by `.`, `/`
    /// or `;`, the last part being the scroll. Everything else is refused.
    pub fn parse(text: &str) -> Result<Coordinate, CoordError> {
        let malformed = || CoordError::Malformed(text.to_string());
        let trimmed = text.trim_matches(|c: char| c.is_ascii_whitespace());
        if trimmed.is_empty() {
            return Ok(Coordinate::ORIGIN);
        }
        let mut values = Vec::with_capacity(DIMENSIONS);
        for digits in trimmed.split(SEPARATORS) {
            if values.len() == DIMENSIONS
                || digits.is_empty()
                || !digits.bytes().all(|b| b.is_ascii_digit())
            {
                return Err(malformed());
            }
            // Digits only, so the parse fails only on overflow: that is "too large".
            let value: u64 = digits.parse().unwrap_or(u64::MAX);
            if value > u64::from(COORDINATE_COMPONENT_MAX) {
                return Err(CoordError::TooLarge(text.to_string()));
            }
            values.push(value as u32);
        }
        let mut parts = [1u32; DIMENSIONS];
        let (last, leading) = values.split_last().ok_or_else(malformed)?;
        parts[..leading.len()].copy_from_slice(leading);
        parts[DIMENSIONS - 1] = *last;
        if parts.contains(&0) {
            return Err(CoordError::Zero(text.to_string()));
        }
        Ok(Coordinate(parts))
    }

    /// Parses exactly nine parts, as SQ's query API does for `from`, `to` and `set` (whitespace
    /// around is trimmed; no short forms, no empty text).
    pub fn parse_full(text: &str) -> Result<Coordinate, CoordError> {
        let trimmed = text.trim_matches(|c: char| c.is_ascii_whitespace());
        if trimmed.split(SEPARATORS).count() != DIMENSIONS {
            return Err(CoordError::Malformed(text.to_string()));
        }
        Coordinate::parse(trimmed)
    }

    /// True when a component is above [`SQ_COMPONENT_MAX`]: SQ 0.6.0 cannot keep text there.
    pub fn above_sq_range(&self) -> bool {
        self.0.iter().any(|&p| p > SQ_COMPONENT_MAX)
    }

    /// Moves across one break of dimension `dim`: that component grows by one and every lower
    /// component resets to 1. Returns false, leaving `self` unchanged, past the component cap.
    pub fn advance(&mut self, dim: usize) -> bool {
        assert!(dim < DIMENSIONS, "dimension {dim} out of range");
        if self.0[dim] >= COORDINATE_COMPONENT_MAX {
            return false;
        }
        self.0[dim] += 1;
        for lower in &mut self.0[dim + 1..] {
            *lower = 1;
        }
        true
    }

    /// The number of break bytes libphext writes to move from `self` to a later `to`: breaks of
    /// the highest dimension that differs, then a run for each lower dimension from 1.
    pub fn breaks_to(&self, to: &Coordinate) -> u64 {
        debug_assert!(self <= to, "breaks_to goes forward only");
        match (0..DIMENSIONS).find(|&d| self.0[d] != to.0[d]) {
            None => 0,
            Some(d) => {
                let first = u64::from(to.0[d] - self.0[d]);
                first + to.0[d + 1..].iter().map(|&v| u64::from(v - 1)).sum::<u64>()
            }
        }
    }

    /// Appends the breaks that move from `self` to a later `to`, as [`breaks_to`] counts them.
    ///
    /// [`breaks_to`]: Coordinate::breaks_to
    pub fn write_breaks_to(&self, to: &Coordinate, out: &mut Vec<u8>) {
        let Some(d) = (0..DIMENSIONS).find(|&d| self.0[d] != to.0[d]) else {
            return;
        };
        out.extend(std::iter::repeat_n(BREAKS[d], (to.0[d] - self.0[d]) as usize));
        for (lower, &brk) in BREAKS.iter().enumerate().skip(d + 1) {
            out.extend(std::iter::repeat_n(brk, (to.0[lower] - 1) as usize));
        }
    }
}

impl fmt::Display for Coordinate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.0;
        write!(
            f,
            "{}.{}.{}/{}.{}.{}/{}.{}.{}",
            p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: every accepted spelling parses to the same coordinate, every malformed one is refused.
    #[test]
    fn parse_accepts_and_refuses() {
        let want = Coordinate([1, 2, 3, 4, 5, 6, 7, 8, 9]);
        for ok in [
            "1.2.3/4.5.6/7.8.9",
            "1.2.3;4.5.6;7.8.9",
            "1.2.3/4.5.6;7.8.9",
            "01.2.3/4.5.6/7.8.9",
            " 1.2.3/4.5.6/7.8.9\t\n",
        ] {
            assert_eq!(Coordinate::parse(ok), Ok(want), "{ok:?}");
        }
        for bad in [
            "garbage",
            "1.1.1/1.1.1/1.1.1/1",
            "a.b.c/1.1.1/1.1.1",
            "1.1.1/1.1.1/1.1.1.1",
            "1..1/1.1.1/1.1.1",
            "1.1.1/1.1.1/1.1.-1",
            "1.1.1/1.1.1/1.1.+1",
            "1.1.1//1.1.1",
            "1.1.1/1.1.1/1. 1.1",
            "/1.1.1",
            "1.1.1/",
            "test-agent.1.1/test.basic/1.1.1",
        ] {
            assert!(matches!(Coordinate::parse(bad), Err(CoordError::Malformed(_))), "{bad:?}");
        }
        assert!(matches!(Coordinate::parse("1.1.1/1.1.1/1.1.0"), Err(CoordError::Zero(_))));
        assert!(matches!(
            Coordinate::parse("1.1.1/1.1.1/1.1.1000001"),
            Err(CoordError::TooLarge(_))
        ));
        assert!(matches!(
            Coordinate::parse("1.1.1/1.1.1/1.1.99999999999999999999999"),
            Err(CoordError::TooLarge(_))
        ));
        assert_eq!(want.to_string(), "1.2.3/4.5.6/7.8.9");
    }

    // Goal: the forms SQ accepts mean here what they mean to SQ (libphext's to_coordinate):
    // an empty text is the origin, short forms fill from the library and end at the scroll.
    #[test]
    fn short_forms_read_as_sq_reads_them() {
        let c = |s: &str| Coordinate::parse(s).unwrap().to_string();
        assert_eq!(c(""), "1.1.1/1.1.1/1.1.1");
        assert_eq!(c("  "), "1.1.1/1.1.1/1.1.1");
        assert_eq!(c("42.1.1/11.1.1"), "42.1.1/11.1.1/1.1.1");
        assert_eq!(c("42.1.1/11.1.7"), "42.1.1/11.1.1/1.1.7");
        assert_eq!(c("2.3"), "2.1.1/1.1.1/1.1.3");
        assert_eq!(c("2;3"), "2.1.1/1.1.1/1.1.3");
        assert_eq!(c("5"), "1.1.1/1.1.1/1.1.5");
        for text in ["", "5", "2.3", "42.1.1/11.1.7", "1.2.3/4.5.6/7.8.9", " 7.1.1/1.1.1 "] {
            let ours = Coordinate::parse(text).unwrap().components().map(u64::from);
            assert_eq!(ours, sq_reading(text), "{text:?}");
        }
    }

    // Goal: a refusal says what SQ would have done, from SQ's own reading of the text.
    #[test]
    fn refusals_say_what_sq_would_do() {
        let msg = |s: &str| Coordinate::parse(s).unwrap_err().to_string();
        let words = msg("test-agent.1.1/test.basic/1.1.1");
        assert!(words.contains("1.1.0/0.1.1/1.1.1"), "{words}");
        assert!(words.contains("L.S.S/C.V.B/C.S.S"), "{words}");
        assert!(msg("abc").contains("use 1.1.1/1.1.1/1.1.1"), "{}", msg("abc"));
        assert!(msg("1.1.1/1.1.1/1.1.1/5").contains("use 1.1.1/1.1.1/1.1.5"));
        assert_eq!(sq_reading("2026.2.22/1.1.1/1.1.1")[0], 2026);
        assert!(sq_would("2026.2.22/1.1.1/1.1.1").contains("move the text to 999.2.22/1.1.1/1.1.1"));
        assert!(Coordinate::parse("1000.1.1/1.1.1/1.1.1").unwrap().above_sq_range());
        assert!(!Coordinate::parse("999.1.1/1.1.1/1.1.1").unwrap().above_sq_range());
        assert!(Coordinate::parse_full("1.1.1").is_err());
        assert!(Coordinate::parse_full(" 1.1.1;1.1.1;1.1.2 ").is_ok());
    }

    // Goal: break counting agrees with the bytes written, for a few hand-checked pairs.
    #[test]
    fn breaks_between() {
        let c = |s| Coordinate::parse(s).unwrap();
        let cases = [
            ("1.1.1/1.1.1/1.1.1", "1.1.1/1.1.1/1.1.1", vec![]),
            ("1.1.1/1.1.1/1.1.1", "1.1.1/1.1.1/1.1.3", vec![0x17, 0x17]),
            ("1.1.1/1.1.1/1.1.2", "2.1.1/1.1.1/1.1.3", vec![0x01, 0x17, 0x17]),
            ("1.1.1/1.1.1/1.1.2", "1.1.1/1.1.1/1.3.1", vec![0x18, 0x18]),
            ("1.1.1/1.1.1/1.3.1", "1.2.1/1.1.1/1.1.1", vec![0x1F]),
        ];
        for (a, b, want) in cases {
            let mut out = Vec::new();
            c(a).write_breaks_to(&c(b), &mut out);
            assert_eq!(out, want, "{a} -> {b}");
            assert_eq!(c(a).breaks_to(&c(b)), want.len() as u64);
        }
    }
}
