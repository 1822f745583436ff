//! Messages between processes, carried in transport frames.
//!
//! Every message is wrapped in an [`Envelope`] that names the protocol version; a peer that
//! speaks another version is answered with [`WireError::Version`] and nothing else is read.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The version of the messages in this module. Bump on any change to their encoding.
/// Version 4: `NodeResponse::HandoffStreamed` (a handoff file's head, its body in frames after
/// it) joined `NodeResponse`; a version 3 peer cannot decode it, and must not be asked.
/// Version 5: admin answers travel typed (`proto::admin::AdminAnswer` in `NodeResponse::Admin`)
/// instead of as JSON text; the gateway renders the JSON.
/// Version 6: `NodeResponse::Removed` (a node's gossip answered with "you were removed") joined
/// `NodeResponse`.
/// Version 7: a whole registry of more than `cluster::VIEW_TENANTS_PER_PART` tenants travels in
/// parts (`ViewUpdate::FullFirst`, `NodeRequest::ViewPage`, `NodeResponse::ViewPage`).
/// Version 8: replication (`NodeRequest::Replicate`, `NodeResponse::Replicated`), node leases
/// (`Lease`, `ConfirmDown`), R and the nodes marked down in the health report
/// (`AdminOp::SetReplicas`), and each tenant's replicas in its stats.
/// Version 9: catch-up by snapshot (`NodeRequest::CatchUp`, `SnapshotTake`, `SnapshotRead`,
/// `SnapshotDone`).
/// Version 10: joins and drains with R > 1 (`NodeRequest::Enter`, `NodeResponse::Entered`).
/// Version 11: a lease request says which mark of its sender the sender knows
/// (`NodeRequest::Lease::mark_epoch`).
pub const WIRE_VERSION: u16 = 11;

/// The largest message either side encodes or decodes, in bytes: 64 MiB. It is also the
/// transport's frame limit (`transport::FRAME_BYTES_MAX`): one message fills one frame. It bounds
/// what one stream can make a peer buffer, lies far above any API request (the gateway's body
/// limit is smaller), holds one handoff chunk, and fits the frame's u32 length field.
pub const MESSAGE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Bytes a decode may claim for each byte of its input. bincode claims a value's in-memory size
/// before reading it (a string's length prefix, 8 bytes for a one-byte varint u64, 16 for a
/// u128), so a valid encoding never claims more than 16 per byte; a forged length prefix in a
/// short message must not make the receiver allocate up to [`MESSAGE_BYTES_MAX`].
pub const DECODE_CLAIM_PER_INPUT_BYTE: usize = 16;

/// The smallest claim budget of a decode, in bytes, whatever its input: small enough to be
/// harmless, large enough that budgets come in few tiers.
pub const DECODE_CLAIM_FLOOR_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("peer speaks version {theirs}, this side {ours}")]
    Version { theirs: u16, ours: u16 },
    #[error("cannot decode message: {0}")]
    Decode(String),
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// Every message travels as `(version, body)`. This is the one envelope: the cluster messages
/// here and the registry's Raft RPCs (with their own version and limit) both use it.
#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    version: u16,
    body: T,
}

/// Encodes `body` with the current wire version.
pub fn encode<T: Serialize>(body: &T) -> Result<Vec<u8>, WireError> {
    encode_versioned::<MESSAGE_BYTES_MAX, T>(WIRE_VERSION, body)
}

/// Decodes a message, refusing any other wire version before reading the body.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    decode_versioned::<MESSAGE_BYTES_MAX, T>(WIRE_VERSION, bytes)
}

/// Encodes `body` in an envelope stamped `version`, refusing more than `LIMIT_BYTES`.
pub fn encode_versioned<const LIMIT_BYTES: usize, T: Serialize>(
    version: u16,
    body: &T,
) -> Result<Vec<u8>, WireError> {
    let config = bincode::config::standard().with_limit::<LIMIT_BYTES>();
    bincode::serde::encode_to_vec(Envelope { version, body }, config)
        .map_err(|e| WireError::Encode(e.to_string()))
}

/// Decodes an envelope stamped `version`, claiming at most `LIMIT_BYTES` ([`decode_bounded`]).
/// The version is read first, so a newer body layout is reported as a version mismatch; bytes
/// after the body are refused, since they mean the two ends disagree about the type.
pub fn decode_versioned<const LIMIT_BYTES: usize, T: DeserializeOwned>(
    version: u16,
    bytes: &[u8],
) -> Result<T, WireError> {
    let (theirs, _): (u16, usize) =
        decode_bounded::<_, LIMIT_BYTES>(bytes).map_err(|e| WireError::Decode(e.to_string()))?;
    if theirs != version {
        return Err(WireError::Version { theirs, ours: version });
    }
    let (envelope, used): (Envelope<T>, usize) =
        decode_bounded::<_, LIMIT_BYTES>(bytes).map_err(|e| WireError::Decode(e.to_string()))?;
    if used != bytes.len() {
        return Err(WireError::Decode(format!("{} bytes after the message", bytes.len() - used)));
    }
    Ok(envelope.body)
}

/// The claim budgets a decode can get, smallest first; a larger input gets the limit itself.
const CLAIM_TIERS: [usize; 3] = [DECODE_CLAIM_FLOOR_BYTES, 1024 * 1024, 8 * 1024 * 1024];

/// The most a [`decode_bounded`] of `input_len` bytes may claim under the limit `max`.
pub fn decode_claim_budget(input_len: usize, max: usize) -> usize {
    let wanted = input_len.saturating_mul(DECODE_CLAIM_PER_INPUT_BYTE);
    CLAIM_TIERS.into_iter().find(|&tier| wanted <= tier && tier < max).unwrap_or(max)
}

/// Decodes `T` from the start of `bytes` (bincode 2, serde, standard config), returning it and
/// the bytes it used. The decode claims (allocates) at most [`decode_claim_budget`] bytes:
/// [`DECODE_CLAIM_PER_INPUT_BYTE`] × the input rounded up to a tier, and never more than `MAX`.
/// bincode allocates a string or byte string before it checks that its bytes are there.
pub fn decode_bounded<T: DeserializeOwned, const MAX: usize>(
    bytes: &[u8],
) -> Result<(T, usize), bincode::error::DecodeError> {
    use bincode::config::standard;
    use bincode::serde::decode_from_slice;
    const T0: usize = CLAIM_TIERS[0];
    const T1: usize = CLAIM_TIERS[1];
    const T2: usize = CLAIM_TIERS[2];
    match decode_claim_budget(bytes.len(), MAX) {
        T0 => decode_from_slice(bytes, standard().with_limit::<T0>()),
        T1 => decode_from_slice(bytes, standard().with_limit::<T1>()),
        T2 => decode_from_slice(bytes, standard().with_limit::<T2>()),
        _ => decode_from_slice(bytes, standard().with_limit::<MAX>()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: a message round-trips, and one stamped with another version is refused.
    #[test]
    fn versioned_round_trip() {
        let bytes = encode(&("hello".to_string(), 7u64)).unwrap();
        assert_eq!(decode::<(String, u64)>(&bytes).unwrap(), ("hello".to_string(), 7));
        let other = encode_versioned::<MESSAGE_BYTES_MAX, u8>(WIRE_VERSION + 1, &1).unwrap();
        assert_eq!(
            decode::<u8>(&other),
            Err(WireError::Version { theirs: WIRE_VERSION + 1, ours: WIRE_VERSION })
        );
        assert!(decode::<u64>(&[0xff, 0xff, 0xff]).is_err());
    }

    // Goal: a message with bytes after it (the two ends disagree about the type), or cut short,
    // is refused rather than silently read.
    #[test]
    fn trailing_and_missing_bytes_are_refused() {
        let bytes = encode(&("key".to_string(), vec![0u8, 1, 2])).unwrap();
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(decode::<(String, Vec<u8>)>(&longer), Err(WireError::Decode(_))));
        let short = &bytes[..bytes.len() - 1];
        assert!(matches!(decode::<(String, Vec<u8>)>(short), Err(WireError::Decode(_))));
        assert!(matches!(decode::<(String, Vec<u8>)>(&[]), Err(WireError::Decode(_))));
    }
}
