//! Property tests of the registry's decoders of untrusted bytes: log records replayed at open,
//! the vote file, snapshot images (from disk or from the leader) and Raft RPC messages. Each
//! property feeds arbitrary bytes and valid encodings mutated (bit flips, truncations, inflated
//! length prefixes, and damaged payloads re-framed with a valid checksum so that the decode
//! itself is reached) and checks that the decoder neither panics nor allocates past its limit,
//! measured by a counting allocator around the one decode call.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use damage::{mutate, varint, Mutation};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, VoteRequest, VoteResponse};
use openraft::{BasicNode, CommittedLeaderId, EntryPayload, Membership};
use proptest::prelude::*;
use proptest::test_runner::Config;
use proto::wire::decode_claim_budget;

use crate::command::Command;
use crate::disk::{self, RECORD_PAYLOAD_BYTES_MAX};
use crate::log_store::{replay, LogRecord, Meta};
use crate::network::{self, Addressed, RaftRpc, RaftRpcReply, RPC_MESSAGE_BYTES_MAX};
use crate::snapshot::{decode_state, encode_state, encode_state_chunked};
use crate::state::{
    Handoff, NodeRecord, NodeState, RegistryState, TenantRecord, Tier, ACTIVE_NODES_MAX,
};
use crate::types::{Entry, LogId, Vote};

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

fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z0-9:.-]{0,12}", any::<String>().prop_map(|s| s.chars().take(16).collect())]
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        (text(), text(), any::<u64>()).prop_map(|(id, hash, at)| {
            Command::AddTenant(TenantRecord::new(id, Tier::Pro, hash, at))
        }),
        (text(), text()).prop_map(|(id, new_hash)| Command::RotateKey { id, new_hash }),
        (any::<u64>(), text()).prop_map(|(id, addr)| Command::NodeJoin { id, addr }),
        text().prop_map(|hash| Command::SetAdminKeyHash { hash }),
        (text(), any::<u64>()).prop_map(|(tenant, epoch)| Command::HandoffDone { tenant, epoch }),
    ]
}

fn log_id(index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(index / 7 + 1, index % 3), index)
}

fn membership(ids: &BTreeSet<u64>) -> Membership<u64, BasicNode> {
    let nodes: BTreeMap<u64, BasicNode> =
        ids.iter().map(|&id| (id, BasicNode::new(format!("127.0.0.1:{id}")))).collect();
    Membership::new(vec![ids.clone()], nodes)
}

fn payload() -> impl Strategy<Value = EntryPayload<crate::types::TypeConfig>> {
    prop_oneof![
        Just(EntryPayload::Blank),
        command().prop_map(EntryPayload::Normal),
        prop::collection::btree_set(0u64..9, 1..4)
            .prop_map(|ids| EntryPayload::Membership(membership(&ids))),
    ]
}

/// Entries with ascending indexes from `first`.
fn entries(first: u64) -> impl Strategy<Value = Vec<Entry>> {
    prop::collection::vec(payload(), 0..6).prop_map(move |ps| {
        ps.into_iter()
            .enumerate()
            .map(|(i, payload)| Entry { log_id: log_id(first + i as u64), payload })
            .collect()
    })
}

/// Payloads of a valid log file: maybe a purge record, then entries.
fn log_payloads() -> impl Strategy<Value = Vec<Vec<u8>>> {
    (any::<bool>(), 1u64..1000).prop_flat_map(|(purged, first)| {
        entries(first).prop_map(move |es| {
            let mut out = Vec::new();
            if purged {
                let rec = LogRecord::Purged(log_id(first - 1));
                out.push(disk::encode("log", &rec).expect("encodes"));
            }
            for e in es {
                out.push(disk::encode("log", &LogRecord::Entry(e)).expect("encodes"));
            }
            out
        })
    })
}

fn frame_all(payloads: &[Vec<u8>]) -> Vec<u8> {
    payloads.iter().flat_map(|p| disk::frame(p)).collect()
}

/// How much one replay of a log file may hold, for `len` bytes of file: the entries it keeps
/// (each a few hundred bytes of structure for at least a dozen bytes of record, plus its
/// index in two maps) and the claim budget of the largest record it decodes.
fn replay_limit(len: usize) -> usize {
    64 * len + decode_limit(len, RECORD_PAYLOAD_BYTES_MAX)
}

fn tenant() -> impl Strategy<Value = TenantRecord> {
    ("[a-z0-9-]{1,10}", prop::collection::vec("[0-9a-f]{64}", 1..3), any::<bool>()).prop_map(
        |(id, hashes, archived)| {
            let mut t = TenantRecord::new(id, Tier::Team, hashes[0].clone(), 7);
            t.key_hashes = hashes;
            t.archived = archived;
            t
        },
    )
}

fn node_state() -> impl Strategy<Value = NodeState> {
    prop_oneof![
        Just(NodeState::Joining),
        Just(NodeState::Active),
        Just(NodeState::Draining),
        Just(NodeState::Removed)
    ]
}

fn registry_state() -> impl Strategy<Value = RegistryState> {
    (
        prop::collection::vec(tenant(), 0..4),
        prop::option::of("[0-9a-f]{64}"),
        prop::collection::vec((1u64..20, text(), node_state()), 0..4),
        any::<u64>(),
        prop::collection::vec(("[a-z]{1,6}", 1u64..5, 1u64..5, any::<u64>()), 0..3),
        prop::collection::vec("[a-z]{1,6}", 0..3),
    )
        .prop_map(|(tenants, admin, nodes, epoch, handoffs, purged)| {
            RegistryState::from_parts(
                tenants,
                admin,
                nodes.into_iter().map(|(id, addr, state)| NodeRecord { id, addr, state }).collect(),
                epoch,
                handoffs
                    .into_iter()
                    .map(|(tenant, from, to, epoch)| Handoff { tenant, from, to, epoch })
                    .collect(),
                purged,
            )
        })
}

/// Bytes the placement ring holds for each active node: [`crate::VNODES_PER_NODE`] virtual
/// nodes of about 90 bytes each (measured: 54 MB for 300 nodes, building included).
const RING_BYTES_PER_NODE: usize = crate::VNODES_PER_NODE as usize * 96;

/// What one snapshot decode may hold, for `len` bytes of image: a bounded decode, the state
/// built from it, and the placement ring of its active nodes: at most [`ACTIVE_NODES_MAX`], and
/// at most one per 3 bytes of image (an id, an empty address and a state).
fn snapshot_limit(len: usize) -> usize {
    let ring = RING_BYTES_PER_NODE * ACTIVE_NODES_MAX.min(len / 3);
    2 * decode_limit(len, RECORD_PAYLOAD_BYTES_MAX) + 64 * len + ring
}

fn vote() -> impl Strategy<Value = Vote> {
    (any::<u64>(), 0u64..9, any::<bool>()).prop_map(|(term, node, committed)| {
        if committed {
            Vote::new_committed(term, node)
        } else {
            Vote::new(term, node)
        }
    })
}

/// An encoded Raft request.
fn rpc() -> impl Strategy<Value = Vec<u8>> {
    let encoded = |to: u64, rpc: RaftRpc| network::encode(Addressed { to, rpc }).expect("encodes");
    prop_oneof![
        (0u64..9, vote(), prop::option::of(any::<u64>())).prop_map(move |(to, v, last)| {
            encoded(to, RaftRpc::Vote(VoteRequest::new(v, last.map(log_id))))
        }),
        (0u64..9, vote(), 1u64..100, entries(100), prop::option::of(0u64..100)).prop_map(
            move |(to, vote, prev, entries, commit)| {
                let request = AppendEntriesRequest {
                    vote,
                    prev_log_id: Some(log_id(prev)),
                    entries,
                    leader_commit: commit.map(log_id),
                };
                encoded(to, RaftRpc::AppendEntries(request))
            }
        ),
    ]
}

/// An encoded Raft reply.
fn reply() -> impl Strategy<Value = Vec<u8>> {
    let encoded = |r: RaftRpcReply| network::encode(r).expect("encodes");
    prop_oneof![
        (vote(), any::<bool>(), prop::option::of(0u64..100)).prop_map(
            move |(vote, granted, last)| {
                encoded(RaftRpcReply::Vote(Ok(VoteResponse::new(vote, last.map(log_id), granted))))
            }
        ),
        Just(()).prop_map(move |()| encoded(RaftRpcReply::AppendEntries(Ok(
            AppendEntriesResponse::Success
        )))),
        vote().prop_map(move |v| {
            encoded(RaftRpcReply::AppendEntries(Ok(AppendEntriesResponse::HigherVote(v))))
        }),
        text().prop_map(move |t| encoded(RaftRpcReply::Refused(t))),
    ]
}

fn check_rpc<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<(), TestCaseError> {
    let (_, peak) = meter::peak(|| network::decode::<T>(bytes).is_ok());
    let limit = decode_limit(bytes.len(), RPC_MESSAGE_BYTES_MAX);
    prop_assert!(peak <= limit, "{} bytes of rpc held {peak}, limit {limit}", bytes.len());
    Ok(())
}

fn check_replay(bytes: &[u8]) -> Result<(), TestCaseError> {
    let (_, peak) = meter::peak(|| replay(Path::new("raft-log"), bytes).is_ok());
    let limit = replay_limit(bytes.len());
    prop_assert!(peak <= limit, "{} bytes of log held {peak}, limit {limit}", bytes.len());
    Ok(())
}

/// The payloads of a sequence of whole records.
fn split_records(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some((payload, used)) = disk::parse_frame(bytes) {
        out.push(payload.to_vec());
        bytes = &bytes[used..];
    }
    out
}

fn check_snapshot(bytes: &[u8]) -> Result<bool, TestCaseError> {
    let (ok, peak) = meter::peak(|| decode_state(Path::new("snapshot"), bytes).is_ok());
    let limit = snapshot_limit(bytes.len());
    prop_assert!(peak <= limit, "{} bytes of snapshot held {peak}, limit {limit}", bytes.len());
    Ok(ok)
}

proptest! {
    #![proptest_config(Config { cases: 512, failure_persistence: None, ..Config::default() })]

    // Goal: a valid log replays whole; damaged anywhere (its frames, or a payload re-framed
    // with a good checksum) it replays to a prefix or is refused as corrupt, without a panic
    // and within bounds.
    #[test]
    fn log_replay_of_damaged_logs(
        payloads in log_payloads(),
        ms in prop::collection::vec(mutation(), 1..4),
        victim in any::<prop::sample::Index>(),
        reframe in any::<bool>(),
    ) {
        let whole = frame_all(&payloads);
        let r = replay(Path::new("raft-log"), &whole).expect("a valid log replays");
        prop_assert_eq!(r.end, whole.len() as u64);
        let damaged = if reframe && !payloads.is_empty() {
            let mut ps = payloads.clone();
            let i = victim.index(ps.len());
            ps[i] = mutate(ps[i].clone(), &ms);
            frame_all(&ps)
        } else {
            mutate(whole, &ms)
        };
        check_replay(&damaged)?;
    }

    // Goal: arbitrary bytes, framed or not, never panic the log replay or the vote file decode.
    #[test]
    fn log_and_meta_of_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check_replay(&bytes)?;
        check_replay(&disk::frame(&bytes))?;
        let (_, peak) = meter::peak(|| disk::decode::<Meta>(Path::new("raft-meta"), &bytes).is_ok());
        prop_assert!(peak <= decode_limit(bytes.len(), RECORD_PAYLOAD_BYTES_MAX));
    }

    // Goal: the vote file round-trips; damaged, it is refused or decodes, within bounds.
    #[test]
    fn meta_of_damaged_records(
        v in prop::option::of(vote()),
        committed in prop::option::of(0u64..1000),
        ms in prop::collection::vec(mutation(), 1..4),
    ) {
        let bytes = disk::encode("meta", &Meta { vote: v, committed: committed.map(log_id) })
            .expect("encodes");
        let back: Meta = disk::decode(Path::new("raft-meta"), &bytes).expect("decodes");
        prop_assert_eq!(back.vote, v);
        let damaged = mutate(bytes, &ms);
        let (_, peak) =
            meter::peak(|| disk::decode::<Meta>(Path::new("raft-meta"), &damaged).is_ok());
        prop_assert!(peak <= decode_limit(damaged.len(), RECORD_PAYLOAD_BYTES_MAX));
    }

    // Goal: a snapshot image of one or many records decodes to the state it was made of;
    // damaged (its frames, or one record's payload re-framed with a good checksum so that its
    // decode is reached), or arbitrary bytes, framed or not, it is refused or decodes, within
    // bounds and without a panic.
    #[test]
    fn snapshot_decode_of_damaged_images(
        state in registry_state(),
        chunk in 1usize..4,
        ms in prop::collection::vec(mutation(), 1..4),
        victim in any::<prop::sample::Index>(),
        reframe in any::<bool>(),
        noise in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let bytes = encode_state_chunked(&state, chunk).expect("encodes");
        prop_assert!(check_snapshot(&bytes)?, "a valid image decodes");
        prop_assert_eq!(decode_state(Path::new("snapshot"), &bytes).ok(), Some(state));
        let damaged = if reframe {
            let mut payloads = split_records(&bytes);
            let i = victim.index(payloads.len());
            payloads[i] = mutate(payloads[i].clone(), &ms);
            frame_all(&payloads)
        } else {
            mutate(bytes, &ms)
        };
        check_snapshot(&damaged)?;
        check_snapshot(&noise)?;
        check_snapshot(&disk::frame(&noise))?;
    }

    // Goal: a Raft request or reply, valid, damaged or arbitrary, never panics the decoder and
    // stays within its bounds.
    #[test]
    fn rpc_decode_of_damaged_messages(
        request in rpc(),
        answer in reply(),
        ms in prop::collection::vec(mutation(), 1..4),
        noise in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        prop_assert!(network::decode::<Addressed>(&request).is_ok());
        check_rpc::<Addressed>(&mutate(request, &ms))?;
        prop_assert!(network::decode::<RaftRpcReply>(&answer).is_ok());
        check_rpc::<RaftRpcReply>(&mutate(answer, &ms))?;
        check_rpc::<Addressed>(&noise)?;
        check_rpc::<RaftRpcReply>(&noise)?;
    }
}

// Goal: a record of a few bytes whose string claims the whole record limit is refused without
// allocating it (bincode allocates a string before it reads it).
#[test]
fn forged_string_length_in_a_record_allocates_nothing_large() {
    let mut bytes =
        disk::encode("cmd", &Command::SetAdminKeyHash { hash: String::new() }).expect("encodes");
    bytes.pop();
    bytes.extend(varint(RECORD_PAYLOAD_BYTES_MAX as u64 - 16));
    let (result, peak) =
        meter::peak(|| disk::decode::<Command>(Path::new("raft-log"), &bytes).is_err());
    assert!(result);
    assert!(peak < 1024 * 1024, "{} bytes held {peak}", bytes.len());
}

// Goal: a snapshot image with one active node more than the limit is refused before its ring is
// built; one at the limit is read, and its ring stays within the named bound; the registry
// refuses to activate a node past the limit, so it never writes an image it cannot read.
#[test]
fn snapshot_with_too_many_active_nodes_is_refused() {
    // States built node by node, without their rings: neither encoding nor the refusal reads it.
    let state = |n: usize| {
        let mut st = RegistryState::default();
        for id in 1..=n as u64 {
            st.nodes.insert(id, NodeRecord { id, addr: String::new(), state: NodeState::Active });
        }
        let joining = NodeRecord { id: 0, addr: "127.0.0.1:1".into(), state: NodeState::Joining };
        st.nodes.insert(0, joining);
        st
    };
    let mut full = state(ACTIVE_NODES_MAX);
    assert_eq!(
        crate::command::apply(&mut full, Command::NodeActivate { id: 0 }),
        Err(crate::command::Rejection::TooManyActiveNodes)
    );
    let over = encode_state(&state(ACTIVE_NODES_MAX + 1)).expect("encodes");
    let (refused, peak) = meter::peak(|| decode_state(Path::new("snapshot"), &over).is_err());
    assert!(refused);
    assert!(peak < 1024 * 1024, "{peak}");
    let at = encode_state(&full).expect("encodes");
    let (read, peak) = meter::peak(|| decode_state(Path::new("snapshot"), &at).is_ok());
    assert!(read);
    assert!(peak <= snapshot_limit(at.len()), "{peak}");
}

// Goal: a snapshot header of a few bytes that claims the most tenant ids allowed, with no
// records after it, is refused without allocating for them; one claiming more is refused
// before anything after it is read.
#[test]
fn snapshot_header_claiming_many_tenants_allocates_nothing_large() {
    let image = encode_state(&RegistryState::default()).expect("encodes");
    let header = split_records(&image).remove(0);
    // The header's layout: version, then the tenant count (a one-byte varint 0 when empty).
    assert_eq!(header[..2], [crate::snapshot::SNAPSHOT_FORMAT_VERSION as u8, 0]);
    let at_limit = crate::TENANT_IDS_MAX as u64;
    for (claimed, refusal) in
        [(at_limit, "snapshot tenants record at byte"), (at_limit + 1, "4000001 tenant ids")]
    {
        let mut forged = header.clone();
        forged.splice(1..2, varint(claimed));
        let forged = disk::frame(&forged);
        let (err, peak) = meter::peak(|| decode_state(Path::new("snapshot"), &forged).err());
        let err = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(refusal), "{err}");
        assert!(peak < 1024 * 1024, "{peak}");
    }
}
