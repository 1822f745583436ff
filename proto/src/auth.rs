//! Key hashing. Keys are 128 random bits, so one SHA-256 is enough: there is nothing to guess.
//! Only the hash is ever stored, sent between processes, or compared.

use sha2::{Digest, Sha256};

/// SHA-256 of a key, in lowercase hex.
pub fn key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Whether a tenant id has the allowed shape: `[a-z0-9][a-z0-9-]{0,62}`.
pub fn valid_tenant_id(id: &str) -> bool {
    let b = id.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}
