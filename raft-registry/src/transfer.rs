//! Leadership transfer: a leader hands the registry to another voter before it is drained, so
//! the cluster is not left without a leader for a lease and an election's random delay when the
//! drained node is stopped or removed.
//!
//! openraft 0.9 has no transfer. What makes one possible here:
//! - a voter refuses a vote only while it holds a lease for a leader it heard (openraft's
//!   `handle_vote_req`). The leader itself has heard no leader since it won, so once it has led
//!   for a lease it grants the vote of a candidate whose log is at least as long as its own, and
//!   steps down;
//! - the candidate's own vote and the old leader's are a majority of three voters, whatever the
//!   third voter's lease.
//!
//! The steps ([`run`]):
//! 1. wait until this node has led for a lease;
//! 2. hold new write rounds ([`crate::batch::Gate`]; the round in flight finishes), so the log
//!    stops growing, and wait until a voter has this node's whole log. The most advanced such
//!    voter is the target, the lowest id among equals;
//! 3. send the target [`RaftRpc::TimeoutNow`]. It checks that the sender is the leader it
//!    follows, in the same term, and stands at once ([`stand_now`]);
//! 4. wait until a leader other than this node is known, then let the held writes go. They find
//!    this node a follower and go to the new leader as any write to a follower does.
//!
//! With more than three voters the target also needs votes of followers whose lease for the old
//! leader has not run out. The old leader stops its heartbeats when it steps down, and the target
//! stands again every [`RESTAND_EVERY`] (at most [`RESTANDS_MAX`] times), so it wins once those
//! leases end, about a lease later: no better than a failover, and no worse. A node too old to
//! decode `TimeoutNow` refuses it; the leader then keeps leading.

use std::time::Duration;

use openraft::ServerState;

use crate::elect::Heard;
use crate::error::RegistryError;
use crate::network::{self, Addressed, RaftRpc, RaftRpcReply};
use crate::registry::{bounded, Registry};
use crate::types::{NodeId, Raft};

/// How often a target that has not won yet stands again.
pub const RESTAND_EVERY: Duration = Duration::from_millis(200);

/// How many times a target stands again before it leaves the rest to its election timer.
pub const RESTANDS_MAX: u32 = 15;

/// The most caught-up voter other than `me` whose matched log reaches `last`, if any: the
/// highest matched index, then the lowest id.
fn target(m: &openraft::RaftMetrics<NodeId, openraft::BasicNode>, me: NodeId) -> Option<NodeId> {
    let replication = m.replication.as_ref()?;
    let last = m.last_log_index;
    m.membership_config
        .membership()
        .voter_ids()
        .filter(|v| *v != me)
        .filter_map(|v| {
            let matched = replication.get(&v).copied().flatten().map(|l| l.index);
            (matched >= last).then_some((matched, v))
        })
        .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
        .map(|(_, v)| v)
}

/// Hands leadership to another voter (see the module documentation). Returns the new leader, or
/// `None` when this node does not lead or is the only voter. On an error this node may still
/// lead (the target never stood) or the cluster elects as after a failure.
pub(crate) async fn run(reg: &Registry) -> Result<Option<NodeId>, RegistryError> {
    let me = reg.id;
    let timing = reg.config.election_timing();
    // A leader that won less than a lease ago would refuse the target's vote; writes go on
    // meanwhile.
    let led = reg.heard.leading_for().unwrap_or_default();
    tokio::time::sleep(timing.lease.saturating_sub(led)).await;
    let _held = bounded("hold writes", reg.config.write_timeout(), reg.write_gate.write()).await?;
    let (term, others) = {
        let m = reg.raft.metrics().borrow().clone();
        let others = m.membership_config.membership().voter_ids().filter(|v| *v != me).count();
        (m.current_term, others)
    };
    let leads = |reg: &Registry| {
        let m = reg.raft.metrics().borrow().clone();
        m.state == ServerState::Leader && m.current_term == term
    };
    if !leads(reg) || others == 0 {
        return Ok(None);
    }
    let caught_up = reg
        .raft
        .wait(Some(timing.lease))
        .metrics(
            |m| m.state != ServerState::Leader || target(m, me).is_some(),
            "a voter with the leader's whole log",
        )
        .await
        .map_err(|_| RegistryError::timeout("a voter catching up for a transfer", timing.lease))?;
    let Some(to) = target(&caught_up, me).filter(|_| leads(reg)) else {
        return Ok(None);
    };
    let addr = caught_up
        .membership_config
        .membership()
        .get_node(&to)
        .map(|n| n.addr.clone())
        .ok_or_else(|| RegistryError::Raft(format!("voter {to} has no address")))?;
    let ask = network::encode(Addressed { to, rpc: RaftRpc::TimeoutNow { from: me, term } })
        .map_err(|e| RegistryError::Raft(e.to_string()))?;
    let reply = bounded("TimeoutNow", timing.lease, reg.transport.send(to, &addr, ask))
        .await?
        .map_err(|e| RegistryError::Raft(format!("TimeoutNow to node {to}: {e}")))?;
    match network::decode::<RaftRpcReply>(&reply) {
        Ok(RaftRpcReply::TimeoutNow(true)) => {}
        Ok(RaftRpcReply::TimeoutNow(false)) => {
            return Err(RegistryError::Raft(format!("node {to} does not follow this leader")))
        }
        Ok(RaftRpcReply::Refused(why)) => {
            return Err(RegistryError::Raft(format!("node {to} refused TimeoutNow: {why}")))
        }
        Ok(_) | Err(_) => {
            return Err(RegistryError::Raft(format!("node {to} answered TimeoutNow wrongly")))
        }
    }
    let limit = RESTAND_EVERY * RESTANDS_MAX + timing.lease;
    let elected = reg
        .raft
        .wait(Some(limit))
        .metrics(|m| m.current_leader.is_some_and(|l| l != me), "another leader")
        .await
        .map_err(|_| RegistryError::timeout("another leader after a transfer", limit))?;
    Ok(elected.current_leader)
}

/// Handles [`RaftRpc::TimeoutNow`] from `from` in `term`: stands for election now if this node
/// is a voter that follows `from` in `term`, and again every [`RESTAND_EVERY`] while no other
/// leader is known. Returns whether it stands.
pub(crate) fn stand_now(raft: &Raft, me: NodeId, from: NodeId, term: u64, heard: &Heard) -> bool {
    let follows = {
        let metrics = raft.metrics();
        let m = metrics.borrow();
        let voter = m.membership_config.membership().voter_ids().any(|v| v == me);
        voter
            && m.state == ServerState::Follower
            && m.current_leader == Some(from)
            && m.current_term == term
    };
    if !follows {
        return false;
    }
    tracing::info!(from, term, "registry leader hands leadership to this node; standing now");
    heard.mark();
    let raft = raft.clone();
    tokio::spawn(async move {
        for _ in 0..=RESTANDS_MAX {
            if raft.trigger().elect().await.is_err() {
                return;
            }
            tokio::time::sleep(RESTAND_EVERY).await;
            let settled = {
                let metrics = raft.metrics();
                let m = metrics.borrow();
                m.state == ServerState::Leader
                    || m.current_leader.is_some_and(|l| l != from)
                    || m.running_state.is_err()
            };
            if settled {
                return;
            }
        }
    });
    true
}
