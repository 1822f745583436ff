//! Property tests of the node's decoders of untrusted bytes: log records replayed at recovery,
//! phext files read at recovery, the handoff manifest a new owner pulls by, and gossip messages.
//! Each property feeds arbitrary bytes and valid encodings mutated (bit flips, truncations,
//! inflated length prefixes, and damaged records re-framed with a valid checksum so that the
//! decode itself is reached) and checks that nothing panics and that the decode and what it
//! feeds hold no more than their limits, measured by a counting allocator.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use damage::{mutate, varint, Mutation};
use proptest::prelude::*;
use proptest::test_runner::Config;
use proto::cluster::{HandoffFile, NodeRequest, NodeResponse};
use proto::wire::{self, decode_claim_budget, MESSAGE_BYTES_MAX};
use proto::{Coordinate, Doc, PhextName};

use super::recovery::replay_segment;
use super::tenant::{doc_memory, PhextDoc};
use super::wal::{decode_next, encode_record, Next, Op, Record, RECORD_PAYLOAD_BYTES_MAX};
use super::ManualClock;
use crate::gossip::{GossipConfig, Health, GOSSIP_NODES_MAX};
use crate::handoff::check_manifest;
use crate::limits::Rollup;

use alloc_meter as meter;

#[global_allocator]
static ALLOC: meter::Counting = meter::Counting;

/// Damages whose forged lengths are measured against the limit of a log record's payload.
fn mutation() -> impl Strategy<Value = Mutation> {
    damage::mutation(RECORD_PAYLOAD_BYTES_MAX as u64)
}

/// The most one bounded decode of `len` bytes may hold under the limit `max`
/// ([`damage::decode_limit`]).
fn decode_limit(len: usize, max: usize) -> usize {
    damage::decode_limit(decode_claim_budget(len, max))
}

fn coordinate() -> impl Strategy<Value = Coordinate> {
    proptest::array::uniform9(1u32..6)
        .prop_filter_map("in range", |c| Coordinate::from_components(c).ok())
}

fn scroll_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z ]{0,12}",
        "[é→a]{0,6}",
        any::<String>().prop_map(|s| s.chars().take(12).collect())
    ]
}

/// A log record as the store writes it, with a phext name that may be invalid.
#[derive(Debug, Clone)]
struct OwnedRecord {
    phext: String,
    op: Op<String>,
}

fn record() -> impl Strategy<Value = OwnedRecord> {
    let phext = prop_oneof![4 => "[a-z][a-z0-9]{0,6}", 1 => any::<String>()];
    let op = prop_oneof![
        (coordinate(), scroll_text()).prop_map(|(c, text)| Op::Set { c, text }),
        (coordinate(), prop_oneof![0u64..20, Just(u64::MAX)], scroll_text())
            .prop_map(|(c, len_before, text)| Op::TruncateAppend { c, len_before, text }),
    ];
    (phext, op).prop_map(|(phext, op)| OwnedRecord { phext, op })
}

/// The framed records of one segment, with LSNs from `start`, and each record's payload.
fn segment(start: u64, records: &[OwnedRecord]) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut log = Vec::new();
    let mut payloads = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let op = match &r.op {
            Op::Set { c, text } => Op::Set { c: *c, text: text.as_str() },
            Op::TruncateAppend { c, len_before, text } => {
                Op::TruncateAppend { c: *c, len_before: *len_before, text: text.as_str() }
            }
        };
        let at = log.len();
        encode_record(&mut log, &Record { lsn: start + i as u64, phext: r.phext.as_str(), op });
        payloads.push(log[at + 8..].to_vec());
    }
    (log, payloads)
}

/// Frames payloads as the log does: length, CRC-32C, payload.
fn reframe(payloads: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in payloads {
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(p).to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}

/// What one replay of a segment of `len` bytes may hold: the documents it builds (each byte of
/// text once in the scroll and once in the copy a truncate-append makes, plus a scroll's
/// overhead for each record of at least 20 bytes) and the claim budget of its largest record.
fn replay_limit(len: usize) -> usize {
    16 * len + decode_limit(len, RECORD_PAYLOAD_BYTES_MAX)
}

fn check_replay(bytes: &[u8]) -> Result<(), TestCaseError> {
    let path = Path::new("00000000000000000001.log");
    let mut docs: HashMap<PhextName, PhextDoc> = HashMap::new();
    let (outcome, peak) = meter::peak(|| {
        let mut last_lsn = 0;
        replay_segment(path, bytes, 1, &mut last_lsn, Some(&mut docs))
            .map(|valid| (valid, last_lsn))
    });
    let limit = replay_limit(bytes.len());
    prop_assert!(peak <= limit, "{} bytes of log held {peak}, limit {limit}", bytes.len());
    if let Ok((valid, _)) = outcome {
        prop_assert!(valid <= bytes.len());
    }
    Ok(())
}

/// What parsing a phext file may hold: the store's own estimate of the document's memory,
/// which the memory budget counts, twice over for growth while scrolls are appended.
fn doc_limit(doc: &Doc) -> usize {
    2 * doc_memory(doc) as usize
}

fn hostile_path() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "phexts/doc.phext",
            "wal/00000000000000000001.log",
            "usage.json",
            "received-epoch",
            "../escape",
            "phexts/../../etc/passwd",
            "/etc/passwd",
            "phexts/",
            "",
            ".",
            "wal/a\\b",
            "other/file",
            "phexts/a/b",
        ])
        .prop_map(str::to_string),
        "[a-z./\\\\]{0,20}",
    ]
}

fn manifest() -> impl Strategy<Value = Vec<HandoffFile>> {
    let len = prop_oneof![0u64..1 << 20, Just(u64::MAX), (u64::MAX / 2)..u64::MAX];
    prop::collection::vec(
        (hostile_path(), len, "[0-9a-f]{32}").prop_map(|(path, len, checksum)| HandoffFile {
            path,
            len,
            checksum,
        }),
        0..6,
    )
}

fn health() -> Health {
    Health::new(1, GossipConfig::default(), Arc::new(ManualClock::new(0)))
}

/// A gossip table entry: its id, its counter and state in a hash map's slot, with room to grow.
const GOSSIP_ENTRY_BYTES: usize = 128;

proptest! {
    #![proptest_config(Config { cases: 1024, failure_persistence: None, ..Config::default() })]

    // Goal: a valid segment replays whole; damaged anywhere (its frames, or a record re-framed
    // with a good checksum) it replays to a prefix or is refused as corrupt, with no panic and
    // within bounds.
    #[test]
    fn wal_replay_of_damaged_segments(
        records in prop::collection::vec(record(), 0..6),
        ms in prop::collection::vec(mutation(), 1..4),
        victim in any::<prop::sample::Index>(),
        at_payload in any::<bool>(),
    ) {
        let (log, payloads) = segment(1, &records);
        let mut at = 0;
        while let Next::Record { len, .. } =
            decode_next(&log[at..], Path::new("x.log")).expect("our own records decode")
        {
            at += len;
        }
        prop_assert_eq!(at, log.len());
        check_replay(&log)?;
        let damaged = if at_payload && !payloads.is_empty() {
            let mut ps = payloads.clone();
            let i = victim.index(ps.len());
            ps[i] = mutate(ps[i].clone(), &ms);
            reframe(&ps)
        } else {
            mutate(log, &ms)
        };
        check_replay(&damaged)?;
    }

    // Goal: arbitrary bytes as a segment, framed with a good checksum or not, never panic.
    #[test]
    fn wal_replay_of_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check_replay(&bytes)?;
        check_replay(&reframe(&[bytes]))?;
    }

    // Goal: a phext file, canonical or damaged, parses or is refused without a panic, holding
    // no more than the memory the store counts for the document.
    #[test]
    fn phext_file_parse(
        scrolls in prop::collection::btree_map(coordinate(), "[a-z]{1,8}", 0..8),
        ms in prop::collection::vec(mutation(), 0..4),
    ) {
        let mut doc = Doc::new();
        for (c, text) in &scrolls {
            doc.set(*c, text.clone());
        }
        let bytes = mutate(doc.to_canonical(), &ms);
        let (parsed, peak) = meter::peak(|| Doc::parse(&bytes));
        if let Ok(parsed) = parsed {
            prop_assert!(peak <= doc_limit(&parsed), "{} bytes held {peak}", bytes.len());
        } else {
            prop_assert!(peak <= 16 * bytes.len() + 64 * 1024, "refused after holding {peak}");
        }
    }

    // Goal: a handoff manifest, valid, damaged or hostile, decodes and is checked without a
    // panic and within bounds; a manifest that passes names only files of a tenant's directory,
    // each once, with lengths whose sum fits.
    #[test]
    fn handoff_manifest_decode_and_check(
        files in manifest(),
        ms in prop::collection::vec(mutation(), 0..3),
    ) {
        let bytes = mutate(wire::encode(&NodeResponse::HandoffManifest(Ok(files))).expect("encodes"), &ms);
        let (checked, peak) = meter::peak(|| match wire::decode::<NodeResponse>(&bytes) {
            Ok(NodeResponse::HandoffManifest(Ok(files))) => Some((check_manifest(&files), files)),
            _ => None,
        });
        prop_assert!(peak <= 2 * decode_limit(bytes.len(), MESSAGE_BYTES_MAX), "held {peak}");
        if let Some((Ok(total), files)) = checked {
            prop_assert!(files.iter().all(|f| crate::store::is_tenant_file_path(&f.path)));
            let paths: std::collections::HashSet<_> = files.iter().map(|f| &f.path).collect();
            prop_assert_eq!(paths.len(), files.len());
            prop_assert_eq!(Some(total), files.iter().try_fold(0u64, |t, f| t.checked_add(f.len)));
        }
    }

    // Goal: a gossip message, valid, damaged or naming thousands of nodes, decodes and merges
    // without a panic; the table never passes its limit, nor the memory of decode and merge.
    #[test]
    fn gossip_decode_and_merge(
        from in any::<u64>(),
        heartbeats in prop::collection::vec(any::<(u64, u64)>(), 0..1500),
        ms in prop::collection::vec(mutation(), 0..3),
        rounds in 1usize..3,
    ) {
        let h = health();
        let bytes = mutate(wire::encode(&NodeRequest::Gossip { from, heartbeats }).expect("encodes"), &ms);
        for _ in 0..rounds {
            let (_, peak) = meter::peak(|| match wire::decode::<NodeRequest>(&bytes) {
                Ok(NodeRequest::Gossip { from, heartbeats }) => h.merge(from, &heartbeats).len(),
                _ => 0,
            });
            let limit = decode_limit(bytes.len(), MESSAGE_BYTES_MAX)
                + 3 * GOSSIP_NODES_MAX * GOSSIP_ENTRY_BYTES;
            prop_assert!(peak <= limit, "{} bytes of gossip held {peak}", bytes.len());
            prop_assert!(h.known_nodes() <= GOSSIP_NODES_MAX);
            let mine = |t: Vec<(u64, u64)>| t.into_iter().find(|&(id, _)| id == 1).map(|e| e.1);
            let before = mine(h.tick(&[])).expect("this node is in its table");
            prop_assert_eq!(mine(h.tick(&[])), Some(before + 1), "this node's heartbeat grows");
        }
    }
}

// Goal: a manifest whose lengths add up past 2^64 is refused (summing them panicked the puller
// in a debug build), and one that names a path out of the tenant's directory is refused.
#[test]
fn manifest_with_overflowing_lengths_or_escaping_paths_is_refused() {
    let file = |path: &str, len| HandoffFile { path: path.into(), len, checksum: String::new() };
    let big = [file("phexts/a.phext", u64::MAX / 2 + 1), file("phexts/b.phext", u64::MAX / 2 + 1)];
    assert!(check_manifest(&big).is_err());
    assert!(check_manifest(&[file("../x", 1)]).is_err());
    assert!(check_manifest(&[file("wal/a.log", 1), file("wal/a.log", 1)]).is_err());
    assert_eq!(check_manifest(&[file("phexts/a.phext", 3), file("usage.json", 4)]), Ok(7));
}

// Goal: a gossip message naming more nodes than the limit leaves the table at the limit, and
// the nodes already known keep being merged.
#[test]
fn gossip_of_many_unknown_nodes_is_capped() {
    let h = health();
    h.merge(2, &[(7, 1)]);
    let flood: Vec<(u64, u64)> =
        (100..100 + 3 * GOSSIP_NODES_MAX as u64).map(|id| (id, 1)).collect();
    h.merge(2, &flood);
    assert_eq!(h.known_nodes(), GOSSIP_NODES_MAX);
    let table = h.merge(2, &[(7, 5)]);
    assert!(table.contains(&(7, 5)), "a known node is still merged");
}

// Goal: a restarted node (counter back at 0) takes up the counter its peers remember for it, so
// its next beat is news to them; a claim at the top of the range is refused, so it keeps growing.
#[test]
fn a_restarted_node_takes_up_its_counter_again() {
    use crate::gossip::HEARTBEAT_CLAIM_MAX;
    let h = health();
    let mine = |t: Vec<(u64, u64)>| t.into_iter().find(|&(id, _)| id == 1).map(|e| e.1);
    h.merge(2, &[(1, 5_000)]);
    assert_eq!(mine(h.tick(&[])), Some(5_001), "a beat after the peers' memory of this node");
    h.merge(2, &[(1, 10)]);
    assert_eq!(mine(h.tick(&[])), Some(5_002), "an older claim changes nothing");
    h.merge(2, &[(1, u64::MAX), (1, HEARTBEAT_CLAIM_MAX)]);
    assert_eq!(mine(h.tick(&[])), Some(5_003), "a claim at the top is refused");
}

// Goal: a usage roll-up file, valid, damaged or arbitrary, decodes or is refused without a panic
// and within a small multiple of its size, and its counts add up without overflow.
proptest! {
    #![proptest_config(Config { cases: 1024, failure_persistence: None, ..Config::default() })]

    #[test]
    fn usage_rollup_decode(
        calls in prop::collection::btree_map("[a-z]{1,8}", any::<u64>(), 0..6),
        day in any::<u64>(),
        ms in prop::collection::vec(mutation(), 0..3),
        noise in prop::collection::vec(any::<u8>(), 0..128),
    ) {
        let rollup = Rollup { day, calls, bytes_in: 1, bytes_out: 2, last_active_ms: Some(day), extra_units: 3 };
        let json = serde_json::to_vec(&rollup).expect("encodes");
        for bytes in [mutate(json, &ms), noise] {
            let (decoded, peak) = meter::peak(|| {
                serde_json::from_slice::<Rollup>(&bytes).ok().map(|r| r.total_calls())
            });
            prop_assert!(peak <= 16 * bytes.len() + 64 * 1024, "{} bytes held {peak}", bytes.len());
            let _ = decoded;
        }
    }
}

// Goal: counts near the top of u64 in a roll-up file saturate instead of overflowing (the sum
// panicked in a debug build and wrapped to a small count in a release one).
#[test]
fn rollup_counts_saturate() {
    let mut r = Rollup::default();
    r.calls.insert("get".into(), u64::MAX);
    r.calls.insert("select".into(), 2);
    assert_eq!(r.total_calls(), u64::MAX);
}

// Goal: a peer's gossip of this node's own heartbeat at the top of the range is ignored, and
// this node's counter keeps growing (one at u64::MAX overflowed in debug, and in release froze it).
#[test]
fn gossip_about_this_node_is_ignored() {
    let h = health();
    h.merge(2, &[(1, u64::MAX), (2, 3)]);
    let mine = |t: Vec<(u64, u64)>| t.into_iter().find(|&(id, _)| id == 1).map(|e| e.1);
    assert_eq!(mine(h.tick(&[])), Some(1));
    assert_eq!(mine(h.tick(&[])), Some(2));
}

// Goal: a record of a few bytes whose text claims the whole record limit is refused as corrupt
// without allocating it (bincode allocates a string before it reads it).
#[test]
fn forged_text_length_in_a_record_allocates_nothing_large() {
    let (_, payloads) = segment(
        1,
        &[OwnedRecord {
            phext: "a".into(),
            op: Op::Set { c: Coordinate::ORIGIN, text: String::new() },
        }],
    );
    let mut payload = payloads[0].clone();
    payload.pop();
    payload.extend(varint(RECORD_PAYLOAD_BYTES_MAX as u64 - 64));
    let framed = reframe(&[payload]);
    let (result, peak) = meter::peak(|| decode_next(&framed, Path::new("x.log")).is_err());
    assert!(result, "a record that checks out but does not decode is corrupt");
    assert!(peak < 1024 * 1024, "{} bytes held {peak}", framed.len());
}
