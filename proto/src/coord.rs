//! Phext coordinates: nine positive integers, `L.S.S/C.V.B/C.S.S`.
//!
//! Parsing is strict on purpose. SQ maps a malformed coordinate to `1.1.1/1.1.1/1.1.1` and lets a
//! zero component corrupt the document; here both are errors and nothing is changed.

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

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoordError {
    #[error("invalid coordinate {0:?}: expected L.S.S/C.V.B/C.S.S with positive integers")]
    Malformed(String),
    #[error("invalid coordinate {0:?}: components start at 1")]
    Zero(String),
    #[error("invalid coordinate {0:?}: a component exceeds {COORDINATE_COMPONENT_MAX}")]
    TooLarge(String),
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

    /// Parses `L.S.S/C.V.B/C.S.S`; `;` is accepted in place of `/`.
    pub fn parse(text: &str) -> Result<Coordinate, CoordError> {
        let malformed = || CoordError::Malformed(text.to_string());
        let mut parts = [0u32; DIMENSIONS];
        let mut count = 0;
        for (g, group) in text.split(['/', ';']).enumerate() {
            if g >= 3 {
                return Err(malformed());
            }
            for (i, digits) in group.split('.').enumerate() {
                if i >= 3 || digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(malformed());
                }
                // Digits only, so the parse fails only on overflow: that is "too large".
                let value: u64 = digits.parse().unwrap_or(u64::MAX);
                if value > u64::from(COORDINATE_COMPONENT_MAX) {
                    return Err(CoordError::TooLarge(text.to_string()));
                }
                parts[g * 3 + i] = value as u32;
                count += 1;
            }
            if count != (g + 1) * 3 {
                return Err(malformed());
            }
        }
        if count != DIMENSIONS {
            return Err(malformed());
        }
        if parts.contains(&0) {
            return Err(CoordError::Zero(text.to_string()));
        }
        Ok(Coordinate(parts))
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
        for ok in
            ["1.2.3/4.5.6/7.8.9", "1.2.3;4.5.6;7.8.9", "1.2.3/4.5.6;7.8.9", "01.2.3/4.5.6/7.8.9"]
        {
            assert_eq!(Coordinate::parse(ok), Ok(want), "{ok}");
        }
        for bad in [
            "",
            "garbage",
            "1.1.1/1.1",
            "1.1.1/1.1.1/1.1",
            "1.1.1/1.1.1/1.1.1/1",
            "a.b.c/1.1.1/1.1.1",
            "1.1.1/1.1.1/1.1.1.1",
            "1..1/1.1.1/1.1.1",
            " 1.1.1/1.1.1/1.1.1",
            "1.1.1/1.1.1/1.1.-1",
            "1.1.1/1.1.1/1.1.+1",
            "1.1.1//1.1.1",
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
