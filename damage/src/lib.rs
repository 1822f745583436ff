//! Valid encodings damaged on purpose, for the property tests of every decoder of untrusted
//! bytes (proto's wire messages, transport's frames, the node's log records and files, the
//! registry's log, snapshots and RPCs). One source for the damages, so that every decoder meets
//! the same ones: bit flips, truncations, inserted bytes and forged length prefixes.
//!
//! Each test still owns its limits and its valid encodings; this crate only breaks them.

use proptest::prelude::*;

/// Heap serde may preallocate for the sequences being decoded at one time: at most 1 MiB for
/// each (serde's cautious size hint), nested at most four deep in the types sq-cloud decodes.
/// A decode's peak heap is bounded by its claim budget plus this.
pub const SEQUENCE_PREALLOC_BYTES: usize = 4 * 1024 * 1024;

/// The most one bounded decode may hold, given its claim budget (the decoder's own
/// `decode_claim_budget` of the input): the budget twice, since the decoded value's own headers
/// are claimed by its fields too, and what serde preallocates.
pub fn decode_limit(claim_budget: usize) -> usize {
    2 * claim_budget + SEQUENCE_PREALLOC_BYTES
}

/// A damage done to a valid encoding.
#[derive(Debug, Clone)]
pub enum Mutation {
    /// Flip bit `bit` of the byte at `at` (positions wrap around the input).
    Flip { at: usize, bit: u8 },
    /// Cut the input at `at`.
    Truncate { at: usize },
    /// Put a bincode varint of `value` over the byte at `at`: a forged length prefix.
    Inflate { at: usize, value: u64 },
    /// Insert a byte at `at`.
    Insert { at: usize, byte: u8 },
}

/// Damages, weighted toward flips and forged lengths. A forged length is one of the widest
/// values, the decoder's own `limit` and the byte under it, or a value between 1 KiB and
/// `limit`, or between 1 MiB and 4 GiB.
pub fn mutation(limit: u64) -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        1 => any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        2 => (any::<usize>(), prop_oneof![
            Just(u64::MAX),
            Just(u32::MAX as u64),
            Just(limit),
            Just(limit - 1),
            1u64 << 10..limit,
            1u64 << 20..1u64 << 32,
        ])
            .prop_map(|(at, value)| Mutation::Inflate { at, value }),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
    ]
}

/// `value` as bincode's variable-length integer.
pub fn varint(value: u64) -> Vec<u8> {
    match value {
        0..=250 => vec![value as u8],
        251..=0xffff => [&[251u8][..], &(value as u16).to_le_bytes()].concat(),
        0x1_0000..=0xffff_ffff => [&[252u8][..], &(value as u32).to_le_bytes()].concat(),
        _ => [&[253u8][..], &value.to_le_bytes()].concat(),
    }
}

/// `bytes` with every damage of `mutations` done in turn.
pub fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let n = bytes.len().max(1);
        match *m {
            Mutation::Flip { at, bit } => {
                if let Some(b) = bytes.get_mut(at % n) {
                    *b ^= 1 << bit;
                }
            }
            Mutation::Truncate { at } => bytes.truncate(at % n),
            Mutation::Inflate { at, value } => {
                let at = (at % n).min(bytes.len());
                let end = (at + 1).min(bytes.len());
                bytes.splice(at..end, varint(value));
            }
            Mutation::Insert { at, byte } => bytes.insert((at % n).min(bytes.len()), byte),
        }
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_widths_follow_bincode() {
        assert_eq!(varint(250), vec![250]);
        assert_eq!(varint(251), vec![251, 251, 0]);
        assert_eq!(varint(0x1_0000), vec![252, 0, 0, 1, 0]);
        assert_eq!(varint(1 << 32), vec![253, 0, 0, 0, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn mutations_wrap_positions_and_forge_lengths() {
        let bytes = vec![0u8, 1, 2, 3];
        assert_eq!(mutate(bytes.clone(), &[Mutation::Flip { at: 5, bit: 0 }]), vec![0, 0, 2, 3]);
        assert_eq!(mutate(bytes.clone(), &[Mutation::Truncate { at: 6 }]), vec![0, 1]);
        assert_eq!(
            mutate(bytes.clone(), &[Mutation::Inflate { at: 1, value: 251 }]),
            vec![0, 251, 251, 0, 2, 3]
        );
        assert_eq!(mutate(bytes, &[Mutation::Insert { at: 4, byte: 9 }]), vec![9, 0, 1, 2, 3]);
        assert_eq!(mutate(Vec::new(), &[Mutation::Inflate { at: 3, value: 7 }]), vec![7]);
    }
}
