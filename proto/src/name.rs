//! Phext names: the `p` parameter, which becomes a file name inside the tenant's directory.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest phext name, in bytes. With the `.phext` suffix it stays under the 255-byte file
/// name limit of common Linux file systems.
pub const PHEXT_NAME_MAX_BYTES: usize = 200;

/// A phext name that cannot leave its tenant's directory.
///
/// Refused: anything holding `..`, `/` or `\` (as SQ refuses them), control characters, and names
/// longer than [`PHEXT_NAME_MAX_BYTES`]. The empty name is a missing name, a different error.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct PhextName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid phext path")]
pub struct BadName;

impl PhextName {
    pub fn parse(name: &str) -> Result<PhextName, BadName> {
        let unsafe_char = |c: char| c == '/' || c == '\\' || c.is_control();
        if name.is_empty() || name.len() > PHEXT_NAME_MAX_BYTES || name.contains("..") || name.contains(unsafe_char) {
            return Err(BadName);
        }
        Ok(PhextName(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The file that holds this phext's canonical bytes.
    pub fn file_name(&self) -> String {
        format!("{}.phext", self.0)
    }
}

impl fmt::Display for PhextName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: names that could escape the directory are refused, ordinary ones kept verbatim.
    #[test]
    fn names() {
        for bad in ["", "..", "../etc/passwd", "a/b", "..\\x", "a\\b", "x..y", "a\0b", "a\nb", &"n".repeat(201)] {
            assert_eq!(PhextName::parse(bad), Err(BadName), "{bad:?}");
        }
        for ok in ["crud", "my notes", "漢字", ".hidden", "a.b", &"n".repeat(200)] {
            assert_eq!(PhextName::parse(ok).unwrap().as_str(), ok);
        }
    }
}
