//! Phext names: the `p` parameter, which becomes a file name inside the tenant's directory.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest phext name, in bytes. With the `.phext` suffix it stays under the 255-byte file
/// name limit of common Linux file systems.
pub const PHEXT_NAME_BYTES_MAX: usize = 200;

/// A phext name that cannot leave its tenant's directory.
///
/// Refused: anything holding `..`, `/` or `\` (as SQ refuses them), control characters, and names
/// longer than [`PHEXT_NAME_BYTES_MAX`]. The empty name is SQ's default document, the one a
/// request without `p` reads and writes; SQ keeps it in `.phext`, and so does this service.
///
/// Decoding checks the name again, so a name from the wire or the disk cannot skip the rules.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PhextName(String);

impl TryFrom<String> for PhextName {
    type Error = BadName;
    fn try_from(name: String) -> Result<PhextName, BadName> {
        PhextName::parse(&name)
    }
}

impl From<PhextName> for String {
    fn from(n: PhextName) -> String {
        n.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid phext path")]
pub struct BadName;

impl PhextName {
    pub fn parse(name: &str) -> Result<PhextName, BadName> {
        let unsafe_char = |c: char| c == '/' || c == '\\' || c.is_control();
        if name.len() > PHEXT_NAME_BYTES_MAX || name.contains("..") || name.contains(unsafe_char) {
            return Err(BadName);
        }
        Ok(PhextName(name.to_string()))
    }

    /// SQ's default document: what a request without `p` (or with an empty one) names.
    pub fn default_document() -> PhextName {
        PhextName(String::new())
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

    // Goal: a name decoded from the wire obeys the same rules as a parsed one.
    #[test]
    fn decoding_checks_the_name() {
        let bytes = crate::wire::encode(&"../etc".to_string()).unwrap();
        assert!(crate::wire::decode::<PhextName>(&bytes).is_err());
        let bytes = crate::wire::encode(&"fine".to_string()).unwrap();
        assert_eq!(crate::wire::decode::<PhextName>(&bytes).unwrap().as_str(), "fine");
        let zero = crate::wire::encode(&[1u32, 1, 1, 1, 1, 1, 1, 1, 0]).unwrap();
        assert!(crate::wire::decode::<crate::Coordinate>(&zero).is_err());
    }

    // Goal: names that could escape the directory are refused, ordinary ones kept verbatim.
    #[test]
    fn names() {
        for bad in [
            "..",
            "../etc/passwd",
            "a/b",
            "..\\x",
            "a\\b",
            "x..y",
            "a\0b",
            "a\nb",
            &"n".repeat(201),
        ] {
            assert_eq!(PhextName::parse(bad), Err(BadName), "{bad:?}");
        }
        for ok in ["crud", "my notes", "漢字", ".hidden", "a.b", &"n".repeat(200)] {
            assert_eq!(PhextName::parse(ok).unwrap().as_str(), ok);
        }
        // The default document is the empty name, in the file SQ uses for it.
        assert_eq!(PhextName::parse(""), Ok(PhextName::default_document()));
        assert_eq!(PhextName::default_document().file_name(), ".phext");
    }
}
