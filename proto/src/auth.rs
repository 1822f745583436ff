//! Tenant ids and key hashing: the one definition of each, used by the gateway, the node, the
//! registry and the tools.
//!
//! Keys are 128 random bits, so one SHA-256 is enough: there is nothing to guess. Only the hash is
//! ever stored, sent between processes, or compared.

use sha2::{Digest, Sha256};

/// The longest tenant id, in bytes: `[a-z0-9][a-z0-9-]{0,62}` (PRODUCT.md §2), so it fits a DNS
/// label.
pub const TENANT_ID_BYTES_MAX: usize = 63;

/// Length of a hex sha256 digest, the only form in which a key leaves the edge.
pub const KEY_HASH_HEX_LEN: usize = 64;

/// SHA-256 of a key, in lowercase hex.
pub fn key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// True when `hash` looks like [`key_hash`]'s output: 64 lower-case hex digits.
pub fn is_valid_key_hash(hash: &str) -> bool {
    hash.len() == KEY_HASH_HEX_LEN
        && hash.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether a tenant id has the allowed shape: `[a-z0-9][a-z0-9-]{0,62}`.
pub fn valid_tenant_id(id: &str) -> bool {
    let b = id.as_bytes();
    let lower_alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= TENANT_ID_BYTES_MAX
        && lower_alnum(&b[0])
        && b.iter().all(|c| lower_alnum(c) || *c == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_id_grammar() {
        // Goal: the id grammar accepts exactly [a-z0-9][a-z0-9-]{0,62}.
        let long_ok = format!("a{}", "-".repeat(62));
        let too_long = format!("a{}", "b".repeat(63));
        for ok in ["a", "0", "acme", "a-b-c", "9lives", long_ok.as_str()] {
            assert!(valid_tenant_id(ok), "{ok:?} should be valid");
        }
        for bad in ["", "-a", "A", "acme_1", "a.b", "a/b", "ä", too_long.as_str(), "a b"] {
            assert!(!valid_tenant_id(bad), "{bad:?} should be invalid");
        }
    }

    #[test]
    fn key_hash_is_sha256_hex() {
        // Goal: key_hash is lower-case hex sha256 and passes the hash validator.
        let h = key_hash("abc");
        assert_eq!(h, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert!(is_valid_key_hash(&h));
        assert!(!is_valid_key_hash("pmb-v1-0123"));
        assert!(!is_valid_key_hash(&h.to_uppercase()));
    }
}
