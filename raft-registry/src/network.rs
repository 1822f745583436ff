//! The network seam: Raft RPCs leave through [`RaftTransport`] as opaque bytes.
//!
//! The sender encodes a [`RaftRpc`] in `proto::wire`'s versioned envelope and hands
//! it to the transport; the receiver passes the bytes to [`crate::Registry::handle_rpc`], which
//! decodes, dispatches to openraft and answers with an encoded [`RaftRpcReply`]. The node crate
//! implements the transport over QUIC, tests and the simulator in memory.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::RPCTypes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::elect::Heard;
use crate::types::{Node, NodeId, Raft, TypeConfig};

/// Version of the Raft RPC envelope. A message of another version is refused, not guessed at.
/// Version 2 names the node a request is for; version 3 carries standard Raft leader ids (the
/// term alone), see [`crate::format`].
pub const RAFT_RPC_VERSION: u16 = 3;

/// Largest RPC message decoded (16 MiB). Bounds what a peer can make us allocate; AppendEntries
/// batches (`max_payload_entries` small commands) and snapshot chunks
/// ([`crate::config::SNAPSHOT_CHUNK_BYTES`]) stay far below it.
pub const RPC_MESSAGE_BYTES_MAX: usize = 16 * 1024 * 1024;

/// A boxed, sendable future, so the transport trait needs no async-trait machinery.
pub type TransportFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Vec<u8>, SendError>> + Send + 'a>>;

/// Why a transport could not deliver an RPC or bring back its reply: the transport's own error.
pub type SendError = Box<dyn std::error::Error + Send + Sync>;

/// Carries one request to node `target` at `addr` and returns its reply bytes. Implementations
/// bound their own connect and I/O time; the registry additionally drops a call after the Raft
/// timeout for that RPC. An `Err` means the peer could not be reached.
pub trait RaftTransport: Send + Sync + 'static {
    fn send(&self, target: u64, addr: &str, payload: Vec<u8>) -> TransportFuture<'_>;
}

/// A Raft request on the wire, with the id of the node it is for. A node refuses a request for
/// another id: an address that now belongs to another node (a restart on a reused port, an
/// operator's typo in `nodes add`) must not let one node vote or acknowledge entries twice.
#[derive(Serialize, Deserialize)]
pub(crate) struct Addressed {
    pub(crate) to: NodeId,
    pub(crate) rpc: RaftRpc,
}

/// A Raft request.
#[derive(Serialize, Deserialize)]
pub enum RaftRpc {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// Leadership transfer ([`crate::transfer`]): the leader `from` of `term`, which holds
    /// its writes and has seen this node's log reach its own, asks this node to stand for
    /// election now. Added after the others, so an older node refuses it as undecodable and
    /// the transfer falls back to an ordinary election.
    TimeoutNow {
        from: NodeId,
        term: u64,
    },
}

/// A Raft reply on the wire.
#[derive(Serialize, Deserialize)]
pub enum RaftRpcReply {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    /// The request could not be decoded or has another version.
    Refused(String),
    /// Whether this node stood, as [`RaftRpc::TimeoutNow`] asked.
    TimeoutNow(bool),
}

/// Encodes in `proto::wire`'s envelope, stamped [`RAFT_RPC_VERSION`].
pub(crate) fn encode<T: Serialize>(body: T) -> Result<Vec<u8>, proto::wire::WireError> {
    proto::wire::encode_versioned::<RPC_MESSAGE_BYTES_MAX, T>(RAFT_RPC_VERSION, &body)
}

/// Decodes `proto::wire`'s envelope, refusing any version but [`RAFT_RPC_VERSION`]; it claims
/// (allocates) at most [`proto::wire::decode_claim_budget`] of its length under
/// [`RPC_MESSAGE_BYTES_MAX`].
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, proto::wire::WireError> {
    proto::wire::decode_versioned::<RPC_MESSAGE_BYTES_MAX, T>(RAFT_RPC_VERSION, bytes)
}

/// Decodes one request for node `me`, runs it on `raft` and encodes the reply. Never fails: a
/// bad request, or one for another node, gets a `Refused` reply.
/// Serves one Raft RPC. An AppendEntries or snapshot accepted from a leader, and a vote granted,
/// mark `heard`: this node's election timer ([`crate::elect`]) starts over.
pub(crate) async fn serve(raft: &Raft, me: NodeId, heard: &Heard, payload: &[u8]) -> Vec<u8> {
    let request = decode::<Addressed>(payload).map_err(|e| e.to_string()).and_then(|a| {
        if a.to == me {
            Ok(a.rpc)
        } else {
            Err(format!("raft rpc for node {}, but this is node {me}", a.to))
        }
    });
    let reply = match request {
        Ok(RaftRpc::AppendEntries(req)) => match well_formed(&req) {
            Err(why) => {
                tracing::warn!(%why, vote = %req.vote, "refusing a malformed append-entries request");
                RaftRpcReply::Refused(why)
            }
            Ok(()) => {
                let reply = raft.append_entries(req).await;
                if matches!(&reply, Ok(r) if !matches!(r, AppendEntriesResponse::HigherVote(_))) {
                    heard.mark_leader();
                }
                RaftRpcReply::AppendEntries(reply)
            }
        },
        Ok(RaftRpc::Vote(req)) => {
            let reply = raft.vote(req).await;
            if matches!(&reply, Ok(r) if r.vote_granted) {
                heard.mark();
            }
            RaftRpcReply::Vote(reply)
        }
        Ok(RaftRpc::InstallSnapshot(req)) => {
            let vote = req.vote;
            let reply = raft.install_snapshot(req).await;
            if matches!(&reply, Ok(r) if r.vote == vote) {
                heard.mark_leader();
            }
            RaftRpcReply::InstallSnapshot(reply)
        }
        Ok(RaftRpc::TimeoutNow { from, term }) => {
            RaftRpcReply::TimeoutNow(crate::transfer::stand_now(raft, me, from, term, heard))
        }
        Err(e) => {
            tracing::warn!(error = %e, "refusing raft rpc");
            RaftRpcReply::Refused(e)
        }
    };
    encode(reply).unwrap_or_else(|e| {
        // Only a reply over the size limit fails to encode; tell the peer instead of hanging it.
        tracing::error!(error = %e, "cannot encode raft rpc reply");
        encode(RaftRpcReply::Refused(format!("reply not encodable: {e}"))).unwrap_or_default()
    })
}

/// Checks what openraft 0.9 takes on trust in an append-entries request: its entries follow
/// `prev_log_id` one index at a time, and none has a term above the sender's vote.
///
/// A leader's replication task that outlives its leadership reads the log as it is now, after
/// a newer leader truncated or purged it, and openraft does not check that the entries it got
/// back start where the request says. Its follower skips a `prev_log_id` at or below its own
/// committed index as matching without looking, so such a request used to leave a hole in the
/// follower's log, and the follower never started again (simulator seed 3070 of `--replicas 3`
/// at 9628de7).
pub(crate) fn well_formed(req: &AppendEntriesRequest<TypeConfig>) -> Result<(), String> {
    let term = req.vote.leader_id.term;
    if let Some(prev) = req.prev_log_id.filter(|p| p.leader_id.term > term) {
        return Err(format!("prev_log_id {prev} is of a term above the sender's vote {term}"));
    }
    let first = req.prev_log_id.map_or(Some(0), |p| p.index.checked_add(1));
    for (i, entry) in req.entries.iter().enumerate() {
        let id = entry.log_id;
        let Some(want) = first.and_then(|f| f.checked_add(i as u64)) else {
            return Err(format!("entry {id} past the last log index"));
        };
        if id.index != want {
            return Err(format!("entry {id} where index {want} follows prev_log_id"));
        }
        if id.leader_id.term > term {
            return Err(format!("entry {id} is of a term above the sender's vote {term}"));
        }
    }
    Ok(())
}

/// A transport or protocol failure, as an `Error` for openraft's error types.
#[derive(Debug)]
struct RpcFailure(String);

impl fmt::Display for RpcFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RpcFailure {}

/// Creates one [`PeerClient`] per replication target.
pub struct NetworkFactory {
    pub(crate) my_id: NodeId,
    pub(crate) transport: Arc<dyn RaftTransport>,
    /// This node's election timer's inputs: a vote reply with a longer log marks it behind.
    pub(crate) heard: Arc<Heard>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerClient {
        PeerClient {
            my_id: self.my_id,
            target,
            node: node.clone(),
            transport: self.transport.clone(),
            heard: self.heard.clone(),
        }
    }
}

/// Sends Raft RPCs to one peer.
pub struct PeerClient {
    my_id: NodeId,
    target: NodeId,
    node: Node,
    transport: Arc<dyn RaftTransport>,
    heard: Arc<Heard>,
}

type RpcResult<T, E> = Result<T, RPCError<NodeId, Node, E>>;

impl PeerClient {
    /// Sends `rpc` and decodes the reply, bounded by the RPC's hard TTL.
    async fn call<E: std::error::Error>(
        &self,
        rpc: RaftRpc,
        action: RPCTypes,
        option: &RPCOption,
    ) -> RpcResult<RaftRpcReply, E> {
        let payload = encode(Addressed { to: self.target, rpc })
            .map_err(|e| RPCError::Network(NetworkError::new(&RpcFailure(e.to_string()))))?;
        let timeout = option.hard_ttl();
        let sent = tokio::time::timeout(
            timeout,
            self.transport.send(self.target, &self.node.addr, payload),
        )
        .await;
        let bytes = match sent {
            Err(_elapsed) => {
                return Err(RPCError::Timeout(Timeout {
                    action,
                    id: self.my_id,
                    target: self.target,
                    timeout,
                }));
            }
            Ok(Err(e)) => {
                return Err(RPCError::Unreachable(Unreachable::new(&RpcFailure(e.to_string()))))
            }
            Ok(Ok(bytes)) => bytes,
        };
        match decode::<RaftRpcReply>(&bytes) {
            Ok(RaftRpcReply::Refused(why)) => {
                Err(RPCError::Network(NetworkError::new(&RpcFailure(why))))
            }
            Ok(reply) => Ok(reply),
            Err(e) => Err(RPCError::Network(NetworkError::new(&RpcFailure(e.to_string())))),
        }
    }

    fn remote<E: std::error::Error>(&self, e: E) -> RPCError<NodeId, Node, E> {
        RPCError::RemoteError(RemoteError::new_with_node(self.target, self.node.clone(), e))
    }

    fn mismatched<E: std::error::Error>(&self) -> RPCError<NodeId, Node, E> {
        RPCError::Network(NetworkError::new(&RpcFailure("reply does not match the request".into())))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>, RaftError<NodeId>> {
        match self.call(RaftRpc::AppendEntries(rpc), RPCTypes::AppendEntries, &option).await? {
            RaftRpcReply::AppendEntries(r) => r.map_err(|e| self.remote(e)),
            _ => Err(self.mismatched()),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        match self.call(RaftRpc::InstallSnapshot(rpc), RPCTypes::InstallSnapshot, &option).await? {
            RaftRpcReply::InstallSnapshot(r) => r.map_err(|e| self.remote(e)),
            _ => Err(self.mismatched()),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>, RaftError<NodeId>> {
        let asked = rpc.last_log_id;
        match self.call(RaftRpc::Vote(rpc), RPCTypes::Vote, &option).await? {
            RaftRpcReply::Vote(r) => {
                if matches!(&r, Ok(reply) if reply.last_log_id > asked) {
                    self.heard.saw_longer_log();
                }
                r.map_err(|e| self.remote(e))
            }
            _ => Err(self.mismatched()),
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, LogId, Vote};

    use super::*;

    fn append(vote_term: u64, prev: Option<(u64, u64)>, entries: &[(u64, u64)]) -> bool {
        let id = |(term, index): (u64, u64)| LogId::new(CommittedLeaderId::new(term, 0), index);
        let req = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(vote_term, 3),
            prev_log_id: prev.map(id),
            entries: entries
                .iter()
                .map(|&e| crate::types::Entry {
                    log_id: id(e),
                    payload: openraft::EntryPayload::Blank,
                })
                .collect(),
            leader_commit: prev.map(id),
        };
        well_formed(&req).is_ok()
    }

    #[test]
    fn append_entries_must_follow_prev_and_stay_within_the_senders_term() {
        // Goal: the request seed 3070 produced (prev 31, entries from 64, one of term 15 under a
        // term-9 vote) is refused; what a leader really sends passes.
        assert!(append(9, Some((1, 31)), &[(1, 32), (9, 33), (9, 34)]));
        assert!(append(9, None, &[(1, 0), (1, 1)]));
        assert!(append(9, Some((9, 62)), &[]), "a heartbeat");
        assert!(!append(9, Some((1, 31)), &[(9, 64), (9, 65), (15, 66)]), "a gap after prev");
        assert!(!append(9, Some((9, 62)), &[(9, 63), (9, 65)]), "a gap between entries");
        assert!(!append(9, Some((9, 62)), &[(9, 63), (15, 64)]), "a term above the vote");
        assert!(!append(9, Some((10, 62)), &[]), "prev of a term above the vote");
        assert!(!append(9, None, &[(1, 1)]), "no prev, yet not from index 0");
        assert!(!append(9, Some((9, u64::MAX)), &[(9, 0)]), "no index follows the last");
    }

    #[test]
    fn envelope_round_trip_and_version_check() {
        // Goal: an RPC survives encode/decode; another version or garbage is refused, not misread.
        let req = VoteRequest {
            vote: Vote::new(3, 1),
            last_log_id: Some(LogId::new(CommittedLeaderId::new(2, 1), 9)),
        };
        let bytes = encode(Addressed { to: 4, rpc: RaftRpc::Vote(req.clone()) })
            .expect("small rpc encodes");
        match decode::<Addressed>(&bytes) {
            Ok(Addressed { to: 4, rpc: RaftRpc::Vote(got) }) => assert_eq!(got, req),
            _ => panic!("vote request did not round-trip"),
        }
        let mut other = bytes.clone();
        other[0] = 1; // varint version 1
        assert!(decode::<Addressed>(&other).is_err_and(|e| e.to_string().contains("version 1")));
        assert!(decode::<Addressed>(&[0xff, 0xff, 0xff]).is_err());
    }
}
