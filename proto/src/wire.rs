//! Messages between processes, carried in transport frames.
//!
//! Every message is wrapped in an [`Envelope`] that names the protocol version; a peer that
//! speaks another version is answered with [`WireError::Version`] and nothing else is read.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The version of the messages in this module. Bump on any change to their encoding.
pub const WIRE_VERSION: u16 = 2;

/// The largest message this side will decode, in bytes; matches the transport's frame limit.
pub const MESSAGE_MAX_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("peer speaks wire version {0}, this side {WIRE_VERSION}")]
    Version(u16),
    #[error("cannot decode message: {0}")]
    Decode(String),
    #[error("cannot encode message: {0}")]
    Encode(String),
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    version: u16,
    body: T,
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MESSAGE_MAX_BYTES>()
}

/// Encodes `body` with the current wire version.
pub fn encode<T: Serialize>(body: &T) -> Result<Vec<u8>, WireError> {
    bincode::serde::encode_to_vec(Envelope { version: WIRE_VERSION, body }, config())
        .map_err(|e| WireError::Encode(e.to_string()))
}

/// Decodes a message, refusing any other wire version before reading the body.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    let (version, _): (u16, usize) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| WireError::Decode(e.to_string()))?;
    if version != WIRE_VERSION {
        return Err(WireError::Version(version));
    }
    let (envelope, _): (Envelope<T>, usize) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| WireError::Decode(e.to_string()))?;
    Ok(envelope.body)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: a message round-trips, and one stamped with another version is refused.
    #[test]
    fn versioned_round_trip() {
        let bytes = encode(&("hello".to_string(), 7u64)).unwrap();
        assert_eq!(decode::<(String, u64)>(&bytes).unwrap(), ("hello".to_string(), 7));
        let other = bincode::serde::encode_to_vec(
            Envelope { version: WIRE_VERSION + 1, body: 1u8 },
            config(),
        )
        .unwrap();
        assert_eq!(decode::<u8>(&other), Err(WireError::Version(WIRE_VERSION + 1)));
        assert!(decode::<u64>(&[0xff, 0xff, 0xff]).is_err());
    }
}
