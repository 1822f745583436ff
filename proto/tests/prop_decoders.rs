//! Property tests of proto's decoders of untrusted bytes: the HTTP request into [`SqRequest`]
//! (`request::parse`) and the versioned wire messages (`wire::decode`) of every type that crosses
//! between processes. Each property feeds arbitrary bytes and valid encodings mutated (bit flips,
//! truncations, inflated length prefixes) and checks that the decoder neither panics nor
//! allocates past its limit, measured by a counting allocator around the one decode call.

use damage::{mutate, varint, Mutation, SEQUENCE_PREALLOC_BYTES};
use proptest::prelude::*;
use proptest::test_runner::Config;

use proto::cluster::{
    AdminOp, Chunk, FetchedRecords, HandoffFile, NodeRequest, NodeResponse, ReplicaAck,
    ReplicaAppend, ReplicaReport, ReplicaStatus, SnapshotListing, TenantUsage,
};
use proto::request::{parse, Method, BODY_BYTES_MAX};
use proto::wire::{self, decode_claim_budget, MESSAGE_BYTES_MAX};
use proto::{ApiError, Coordinate, PhextName, SqRequest, SqResponse};

use alloc_meter as meter;

#[global_allocator]
static ALLOC: meter::Counting = meter::Counting;

/// Damages whose forged lengths are measured against the limit of a wire message.
fn mutation() -> impl Strategy<Value = Mutation> {
    damage::mutation(MESSAGE_BYTES_MAX as u64)
}

/// The most one `wire::decode` of `len` bytes may hold: its claim budget, what serde
/// preallocates, and the decoded value's own headers (bounded by the budget too: every field
/// claims at least its size).
fn wire_limit(len: usize) -> usize {
    2 * decode_claim_budget(len, MESSAGE_BYTES_MAX) + SEQUENCE_PREALLOC_BYTES
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z0-9._/-]{0,12}", any::<String>().prop_map(|s| s.chars().take(24).collect()),]
}

fn coordinate() -> impl Strategy<Value = Coordinate> {
    proptest::array::uniform9(1u32..40)
        .prop_filter_map("in range", |c| Coordinate::from_components(c).ok())
}

fn phext_name() -> impl Strategy<Value = PhextName> {
    "[a-z][a-z0-9_.-]{0,10}".prop_filter_map("valid name", |s| PhextName::parse(&s).ok())
}

fn sq_request() -> impl Strategy<Value = SqRequest> {
    prop_oneof![
        Just(SqRequest::Version),
        (phext_name(), coordinate()).prop_map(|(p, c)| SqRequest::Select { p, c }),
        (phext_name(), coordinate(), text()).prop_map(|(p, c, text)| SqRequest::Insert {
            p,
            c,
            text
        }),
        phext_name().prop_map(|p| SqRequest::Get { p }),
        (phext_name(), prop::collection::vec((coordinate(), text()), 0..4))
            .prop_map(|(p, manifest)| SqRequest::Delta { p, manifest }),
        (phext_name(), prop::collection::vec(coordinate(), 0..4), any::<Option<usize>>()).prop_map(
            |(p, set, limit)| SqRequest::Query {
                p,
                selector: proto::request::Selector { range: None, set },
                limit
            }
        ),
    ]
}

fn api_error() -> impl Strategy<Value = ApiError> {
    prop_oneof![
        text().prop_map(ApiError::BadRequest),
        Just(ApiError::NotFound),
        (text(), any::<u64>())
            .prop_map(|(reason, retry_after_s)| ApiError::Unavailable { reason, retry_after_s }),
        any::<u64>().prop_map(|epoch| ApiError::NotOwner { epoch }),
    ]
}

fn node_request() -> impl Strategy<Value = NodeRequest> {
    prop_oneof![
        (text(), text(), any::<u64>(), sq_request()).prop_map(
            |(tenant, key_hash, epoch, request)| {
                NodeRequest::Sq { tenant, key_hash, epoch, request }
            }
        ),
        (any::<u64>(), any::<u64>())
            .prop_map(|(known_index, wait_ms)| NodeRequest::View { known_index, wait_ms }),
        (text(), text(), any::<Option<u64>>()).prop_map(|(admin_key_hash, tenant_id, quota_mb)| {
            NodeRequest::Admin {
                admin_key_hash,
                op: AdminOp::PatchTenant {
                    tenant_id,
                    tier: None,
                    quota_mb,
                    enabled: None,
                    daily_limit: None,
                },
            }
        }),
        prop::collection::vec(any::<u8>(), 0..64)
            .prop_map(|command| NodeRequest::RaftCommand { command }),
        (text(), any::<u64>())
            .prop_map(|(tenant, epoch)| NodeRequest::HandoffManifest { tenant, epoch }),
        (text(), text(), any::<u64>(), any::<u64>()).prop_map(|(tenant, path, offset, len)| {
            NodeRequest::HandoffRead { tenant, path, offset, len }
        }),
        prop::collection::vec(text(), 0..4)
            .prop_map(|tenants| NodeRequest::TenantUsage { tenants }),
        (any::<u64>(), prop::collection::vec(any::<(u64, u64)>(), 0..6))
            .prop_map(|(from, heartbeats)| NodeRequest::Gossip { from, heartbeats }),
        (any::<u64>(), prop::collection::vec(replica_append(), 0..4))
            .prop_map(|(from, appends)| NodeRequest::Replicate { from, appends }),
        (text(), any::<u64>()).prop_map(|(tenant, ballot)| NodeRequest::Prepare { tenant, ballot }),
        (text(), any::<u64>(), any::<u64>()).prop_map(|(tenant, ballot, after)| {
            NodeRequest::FetchRecords { tenant, ballot, after }
        }),
        any::<(u64, u64, u64)>().prop_map(|(from, lapsed_ms, mark_epoch)| NodeRequest::Lease {
            from,
            lapsed_ms,
            mark_epoch
        }),
        (any::<u64>(), text(), any::<u64>())
            .prop_map(|(from, tenant, epoch)| NodeRequest::CatchUp { from, tenant, epoch }),
        (any::<u64>(), text())
            .prop_map(|(from, tenant)| NodeRequest::SnapshotTake { from, tenant }),
        (any::<(u64, u64, u64)>(), text(), text()).prop_map(|((id, offset, len), tenant, path)| {
            NodeRequest::SnapshotRead { id, tenant, path, offset, len }
        }),
        (any::<u64>(), text()).prop_map(|(id, tenant)| NodeRequest::SnapshotDone { id, tenant }),
        any::<u64>().prop_map(|node| NodeRequest::ConfirmDown { node }),
        (any::<u64>(), text(), any::<u64>()).prop_map(|(from, tenant, epoch)| NodeRequest::Enter {
            from,
            tenant,
            epoch
        }),
    ]
}

fn replica_append() -> impl Strategy<Value = ReplicaAppend> {
    (
        text(),
        any::<(u64, u64, u64, u64)>(),
        any::<Option<u64>>(),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(
            |(tenant, (epoch, ballot, prev_ballot, prev_lsn), truncate_after, records)| {
                ReplicaAppend {
                    tenant,
                    epoch,
                    ballot,
                    prev_ballot,
                    prev_lsn,
                    truncate_after,
                    truncate_if_end: epoch / 3,
                    caught_up: epoch % 2 == 0,
                    records,
                }
            },
        )
}

fn replica_ack() -> impl Strategy<Value = ReplicaAck> {
    prop_oneof![
        any::<(u64, u64, bool)>().prop_map(|(ballot, lsn, learner)| ReplicaAck::Durable {
            ballot,
            lsn,
            learner
        }),
        (any::<(u64, u64)>(), prop::collection::vec(any::<u8>(), 0..32)).prop_map(
            |((ballot, lsn), ballots)| ReplicaAck::NotContinuing { ballot, lsn, ballots }
        ),
        Just(ReplicaAck::NeedsSnapshot),
        text().prop_map(ReplicaAck::Refused),
    ]
}

fn handoff_file() -> impl Strategy<Value = HandoffFile> {
    (text(), any::<u64>(), text()).prop_map(|(path, len, checksum)| HandoffFile {
        path,
        len,
        checksum,
    })
}

fn node_response() -> impl Strategy<Value = NodeResponse> {
    prop_oneof![
        prop_oneof![
            (prop::collection::vec(any::<u8>(), 0..64), any::<bool>())
                .prop_map(|(body, json)| Ok(SqResponse { body, json })),
            api_error().prop_map(Err),
        ]
        .prop_map(NodeResponse::Sq),
        prop::collection::vec(
            (text(), any::<u64>(), any::<Option<u64>>()).prop_map(|(tenant_id, n, last)| {
                TenantUsage {
                    tenant_id,
                    storage_bytes: n,
                    api_calls_today: n / 3,
                    bytes_out_today: n / 7,
                    last_active_ms: last,
                    last_lsn: n / 11,
                    backups: vec![ReplicaStatus {
                        node: n % 5,
                        durable_lsn: last,
                        state: "behind".into(),
                    }],
                }
            }),
            0..4
        )
        .prop_map(NodeResponse::TenantUsage),
        prop::collection::vec(any::<(u64, u64)>(), 0..6)
            .prop_map(|heartbeats| NodeResponse::Gossip { heartbeats }),
        prop_oneof![
            prop::collection::vec(handoff_file(), 0..5).prop_map(Ok),
            api_error().prop_map(Err)
        ]
        .prop_map(NodeResponse::HandoffManifest),
        prop::collection::vec(any::<u8>(), 0..64)
            .prop_map(|b| NodeResponse::HandoffChunk(Ok(Chunk(b)))),
        text().prop_map(NodeResponse::Refused),
        prop::collection::vec(replica_ack(), 0..4).prop_map(NodeResponse::Replicated),
        (prop::collection::vec(any::<u8>(), 0..32), any::<u64>()).prop_map(
            |(ballots, last_lsn)| {
                NodeResponse::Promised(Ok(ReplicaReport { ballots, last_lsn }))
            }
        ),
        (any::<(u64, u64, u64, u64)>(), prop::collection::vec(any::<u8>(), 0..32)).prop_map(
            |((ballot, prev_ballot, prev_lsn, last_lsn), records)| {
                NodeResponse::Fetched(FetchedRecords::Records {
                    ballot,
                    prev_ballot,
                    prev_lsn,
                    records,
                    last_lsn,
                })
            }
        ),
        (any::<bool>(), any::<u64>())
            .prop_map(|(granted, epoch)| NodeResponse::Lease { granted, epoch }),
        prop_oneof![Just(Ok(())), text().prop_map(Err)].prop_map(NodeResponse::CatchingUp),
        prop_oneof![any::<bool>().prop_map(Ok), text().prop_map(Err)]
            .prop_map(NodeResponse::Entered),
        (
            any::<(u64, u64)>(),
            prop::collection::vec(any::<u8>(), 0..32),
            prop::collection::vec(handoff_file(), 0..4)
        )
            .prop_map(|((id, lsn), ballots, files)| {
                let prepared_ballot = (lsn % 2 == 0).then_some(id);
                NodeResponse::Snapshot(Ok(SnapshotListing {
                    id,
                    lsn,
                    ballots,
                    files,
                    prepared_ballot,
                }))
            }),
    ]
}

/// Decodes `bytes` as `T`, checking the allocation bound; true if it decoded.
fn check_wire<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<bool, TestCaseError> {
    let (decoded, peak) = meter::peak(|| wire::decode::<T>(bytes).is_ok());
    prop_assert!(
        peak <= wire_limit(bytes.len()),
        "decoding {} bytes held {peak} bytes, limit {}",
        bytes.len(),
        wire_limit(bytes.len())
    );
    Ok(decoded)
}

/// The request parser's allocation bound: the parsed parameters and body copies, the delta
/// manifest or coordinate list (a few dozen bytes of entry for each line of at least a dozen
/// bytes), doubled by vector growth, and 64 KiB of fixed overhead.
fn request_limit(input_len: usize) -> usize {
    16 * input_len + 64 * 1024
}

fn route() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "version",
            "select",
            "insert",
            "update",
            "delete",
            "toc",
            "get",
            "checksum",
            "delta",
            "query",
            "status",
            "load",
            "json-export",
            "where",
        ])
        .prop_map(str::to_string),
        "[a-z/]{0,12}",
    ]
}

/// A query string built from parameters SQ reads, with values that are valid, percent-encoded,
/// or garbage.
fn query() -> impl Strategy<Value = String> {
    let key =
        prop::sample::select(vec!["p", "c", "s", "from", "to", "set", "limit", "algo", "x", ""]);
    let value = prop_oneof![
        phext_name().prop_map(|p| p.as_str().to_string()),
        coordinate().prop_map(|c| c.to_string()),
        prop::collection::vec(coordinate(), 0..5).prop_map(|cs| cs
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(",")),
        "[0-9]{0,25}",
        "(%[0-9a-fA-F]{0,2}|[a-z+.=&/,])*",
        any::<String>(),
    ];
    prop::collection::vec((key, value), 0..6).prop_map(|pairs| {
        pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")
    })
}

/// A body: a delta manifest, a coordinate list, scroll text or bytes, then mutated.
fn body() -> impl Strategy<Value = Vec<u8>> {
    let manifest = prop::collection::vec((coordinate(), "[0-9a-f]{0,32}"), 0..8).prop_map(|ls| {
        ls.iter().map(|(c, h)| format!("{c}: {h}\n")).collect::<String>().into_bytes()
    });
    let coords = prop::collection::vec(coordinate(), 0..8)
        .prop_map(|cs| cs.iter().map(|c| format!("{c}\n")).collect::<String>().into_bytes());
    let raw = prop::collection::vec(any::<u8>(), 0..256);
    (prop_oneof![manifest, coords, raw], prop::collection::vec(mutation(), 0..3))
        .prop_map(|(b, ms)| mutate(b, &ms))
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![Just(Method::Get), Just(Method::Post)]
}

proptest! {
    #![proptest_config(Config { cases: 2048, failure_persistence: None, ..Config::default() })]

    // Goal: no request, however malformed, panics the parser or makes it hold more than a small
    // multiple of its own size.
    #[test]
    fn request_parse_is_total_and_bounded(m in method(), r in route(), q in query(), b in body()) {
        let input = r.len() + q.len() + b.len();
        let (_, peak) = meter::peak(|| parse(m, &r, &q, &b).is_ok());
        prop_assert!(peak <= request_limit(input), "{input} bytes of request held {peak}");
    }

    // Goal: arbitrary bytes as a NodeRequest or NodeResponse never panic and stay in bounds.
    #[test]
    fn wire_decode_of_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check_wire::<NodeRequest>(&bytes)?;
        check_wire::<NodeResponse>(&bytes)?;
    }

    // Goal: a valid request round-trips, and any damage to it is refused or decodes, within
    // bounds, without a panic.
    #[test]
    fn wire_decode_of_damaged_requests(
        req in node_request(),
        ms in prop::collection::vec(mutation(), 1..4),
    ) {
        let bytes = wire::encode(&req).expect("encodes");
        prop_assert!(check_wire::<NodeRequest>(&bytes)?, "a valid request decodes");
        prop_assert_eq!(wire::decode::<NodeRequest>(&bytes).ok(), Some(req));
        check_wire::<NodeRequest>(&mutate(bytes, &ms))?;
    }

    // Goal: the same for answers, which a gateway or a pulling node decodes.
    #[test]
    fn wire_decode_of_damaged_responses(
        resp in node_response(),
        ms in prop::collection::vec(mutation(), 1..4),
    ) {
        let bytes = wire::encode(&resp).expect("encodes");
        prop_assert!(check_wire::<NodeResponse>(&bytes)?, "a valid response decodes");
        prop_assert_eq!(wire::decode::<NodeResponse>(&bytes).ok(), Some(resp));
        check_wire::<NodeResponse>(&mutate(bytes, &ms))?;
    }
}

// Goal: a message of a few bytes whose string claims the whole message limit is refused before
// the string is allocated (bincode allocates first, then reads).
#[test]
fn forged_string_length_allocates_nothing_large() {
    let mut bytes = wire::encode(&NodeResponse::Refused(String::new())).expect("encodes");
    bytes.pop();
    bytes.extend(varint(MESSAGE_BYTES_MAX as u64 - 16));
    let (result, peak) = meter::peak(|| wire::decode::<NodeResponse>(&bytes));
    assert!(result.is_err());
    assert!(peak <= wire_limit(bytes.len()), "{} bytes held {peak}", bytes.len());
    assert!(peak < 1024 * 1024, "{peak}");
}

// Goal: the largest body is accepted by size, one byte more is refused as too large.
#[test]
fn body_limit_is_the_named_one() {
    let ok = vec![b'a'; BODY_BYTES_MAX];
    assert!(parse(Method::Post, "update", "p=doc&c=1.1.1/1.1.1/1.1.1", &ok).is_ok());
    let over = vec![b'a'; BODY_BYTES_MAX + 1];
    assert!(matches!(
        parse(Method::Post, "update", "p=doc&c=1.1.1/1.1.1/1.1.1", &over),
        Err(ApiError::PayloadTooLarge { .. })
    ));
}
