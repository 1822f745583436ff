//! Property tests of the transport's decoders of untrusted bytes: the frame header a peer sends
//! first, and the bincode payload codec. Each property feeds arbitrary bytes and valid encodings
//! mutated (bit flips, truncations, inflated length prefixes) and checks that the decoder never
//! panics and never allocates past its limit, measured by a counting allocator.

use damage::{mutate, varint, Mutation};
use proptest::prelude::*;
use proptest::test_runner::Config;

use transport::frame::{decode_claim_budget, header, parse_header, HEADER_BYTES, MAGIC};
use transport::{decode, encode, TransportError, FRAME_BYTES_MAX, PROTOCOL_VERSION};

use alloc_meter as meter;

#[global_allocator]
static ALLOC: meter::Counting = meter::Counting;

/// Damages whose forged lengths are measured against the limit of a frame.
fn mutation() -> impl Strategy<Value = Mutation> {
    damage::mutation(FRAME_BYTES_MAX as u64)
}

/// What one payload decode may hold ([`damage::decode_limit`]).
fn decode_limit(len: usize) -> usize {
    damage::decode_limit(decode_claim_budget(len))
}

/// A payload type with every shape the codec meets: strings, byte strings, sequences, options,
/// enums and integers of every width.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
enum Payload {
    Unit,
    Text { name: String, tags: Vec<String> },
    Bytes(#[serde(with = "byte_string")] Vec<u8>),
    Numbers { small: u8, wide: u64, signed: i64, pairs: Vec<(u64, u32)>, maybe: Option<u16> },
    Nested(Vec<Vec<String>>),
}

/// A byte string, not a sequence of u8s (what serde_bytes does, without the dependency).
mod byte_string {
    pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
        }
        d.deserialize_byte_buf(V)
    }
}

fn payload() -> impl Strategy<Value = Payload> {
    let s = || "[a-z0-9]{0,10}";
    prop_oneof![
        Just(Payload::Unit),
        (s(), prop::collection::vec(s(), 0..4))
            .prop_map(|(name, tags)| Payload::Text { name, tags }),
        prop::collection::vec(any::<u8>(), 0..64).prop_map(Payload::Bytes),
        (
            any::<u8>(),
            any::<u64>(),
            any::<i64>(),
            prop::collection::vec(any::<(u64, u32)>(), 0..5),
            any::<Option<u16>>()
        )
            .prop_map(|(small, wide, signed, pairs, maybe)| Payload::Numbers {
                small,
                wide,
                signed,
                pairs,
                maybe
            }),
        prop::collection::vec(prop::collection::vec(s(), 0..3), 0..3).prop_map(Payload::Nested),
    ]
}

fn check_decode(bytes: &[u8]) -> Result<Option<Payload>, TestCaseError> {
    let (decoded, peak) = meter::peak(|| decode::<Payload>(bytes).ok());
    prop_assert!(peak <= decode_limit(bytes.len()), "{} bytes held {peak}", bytes.len());
    Ok(decoded)
}

proptest! {
    #![proptest_config(Config { cases: 4096, failure_persistence: None, ..Config::default() })]

    // Goal: any 8 bytes as a frame header are refused or give a length within the frame limit,
    // allocating nothing but an error's text; a header this side writes parses back.
    #[test]
    fn frame_header_is_total(bytes in any::<[u8; HEADER_BYTES]>(), len in 0..=FRAME_BYTES_MAX) {
        let (parsed, peak) = meter::peak(|| parse_header(&bytes));
        prop_assert!(peak <= 256, "a header parse held {peak} bytes");
        if let Ok(n) = parsed {
            prop_assert!(n <= FRAME_BYTES_MAX);
        }
        prop_assert_eq!(parse_header(&header(len).expect("within the limit")).ok(), Some(len));
    }

    // Goal: a header with our magic and version but any length is accepted exactly when the
    // length is within the limit.
    #[test]
    fn frame_header_length_is_checked(len in any::<u32>()) {
        let mut h = [0u8; HEADER_BYTES];
        h[..3].copy_from_slice(&MAGIC);
        h[3] = PROTOCOL_VERSION;
        h[4..].copy_from_slice(&len.to_be_bytes());
        match parse_header(&h) {
            Ok(n) => prop_assert!(n == len as usize && n <= FRAME_BYTES_MAX),
            Err(TransportError::FrameTooLarge { .. }) => {
                prop_assert!(len as usize > FRAME_BYTES_MAX)
            }
            Err(e) => prop_assert!(false, "unexpected {e}"),
        }
    }

    // Goal: arbitrary payload bytes never panic the codec nor pass its allocation bound.
    #[test]
    fn payload_decode_of_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check_decode(&bytes)?;
    }

    // Goal: a valid payload round-trips; damaged, it is refused or decodes, within bounds.
    #[test]
    fn payload_decode_of_damaged_encodings(
        value in payload(),
        ms in prop::collection::vec(mutation(), 1..4),
    ) {
        let bytes = encode(&value).expect("encodes");
        prop_assert_eq!(check_decode(&bytes)?, Some(value));
        check_decode(&mutate(bytes, &ms))?;
    }
}

// Goal: a six-byte payload whose byte string claims nearly a whole frame is refused without
// allocating it (bincode allocates a byte string before it reads it).
#[test]
fn forged_length_prefix_allocates_nothing_large() {
    let mut bytes = vec![2u8]; // Payload::Bytes
    bytes.extend(varint(FRAME_BYTES_MAX as u64 - 8));
    let (result, peak) = meter::peak(|| decode::<Payload>(&bytes));
    assert!(result.is_err());
    assert!(peak < 1024 * 1024, "{} bytes held {peak}", bytes.len());
}
