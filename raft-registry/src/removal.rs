//! Telling a node that it was removed while it was away.
//!
//! A node learns of its removal by applying the entry that removes it. A node that was down (or
//! cut off) when it was removed never receives that entry: it is no longer a Raft member, so no
//! leader replicates to it, and its own log still lists it as a voter, so it stands for election
//! again and again. Its peers tell it instead: a node whose applied registry records a peer as
//! removed answers that peer's gossip with its applied position ([`Registry::removed_at`]); the
//! node crate carries the claim.
//!
//! A removal is final (ids are never reused) and a committed entry is never undone, so an honest
//! peer's claim is always true. The node still believes a claim only when it cannot be a healthy
//! member and the claimant's registry is newer than its own log ([`judge`]): the claimant must
//! be a member in the node's own registry, the node must not lead, must not have accepted a
//! leader's entries within the leader lease (a leader replicates only to members), and the
//! claimant's applied position must come after the last entry of the node's log, in Raft's
//! order. A stale peer (a registry behind this node's) is not believed, nor one this node does
//! not know, and no claim makes a node that follows a live leader stop. A peer that holds a node
//! certificate and lies can do no more this way than Raft already lets it (it could send forged
//! entries): Raft does not defend against its own members.

use std::time::Duration;

use proto::cluster::RegistryPosition;

use crate::registry::Registry;
use crate::state::NodeState;
use crate::types::NodeId;

/// Why a node did not believe a peer that said it was removed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimRefused {
    /// This node's own registry already records its removal: the node stops on that.
    #[error("this node's registry already records its removal")]
    AlreadyApplied,
    /// The claimant is not a member (joining, active or draining) in this node's registry.
    #[error("node {0} is not a member in this node's registry")]
    UnknownClaimant(NodeId),
    /// This node leads the registry; a removed node is never elected.
    #[error("this node leads the registry")]
    Leading,
    /// This node accepted a leader's entries within the leader lease: a leader replicates only
    /// to members.
    #[error("this node heard a registry leader {ago_ms} ms ago")]
    HearsLeader { ago_ms: u64 },
    /// The claimant's registry is not newer than this node's log.
    #[error("the claimant's registry ({theirs}) is not newer than this node's log ({ours})")]
    NotNewer { theirs: RegistryPosition, ours: RegistryPosition },
}

/// What a node knows of itself when a claim arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Facts {
    /// Its applied registry records it as removed.
    pub(crate) removed: bool,
    /// Its applied registry records the claimant as a member.
    pub(crate) claimant_member: bool,
    pub(crate) leading: bool,
    /// How long ago it last accepted a leader's entries (or a snapshot), if ever.
    pub(crate) leader_heard_ago: Option<Duration>,
    /// The leader lease: what a follower keeps for a leader it heard.
    pub(crate) lease: Duration,
    /// The last entry of its log (none when the log is empty).
    pub(crate) last_log: Option<RegistryPosition>,
}

/// Whether a node with `facts` believes `claimant`, whose applied registry at `theirs` records
/// the node as removed.
pub(crate) fn judge(
    facts: Facts,
    claimant: NodeId,
    theirs: RegistryPosition,
) -> Result<(), ClaimRefused> {
    if facts.removed {
        return Err(ClaimRefused::AlreadyApplied);
    }
    if !facts.claimant_member {
        return Err(ClaimRefused::UnknownClaimant(claimant));
    }
    if facts.leading {
        return Err(ClaimRefused::Leading);
    }
    if let Some(ago) = facts.leader_heard_ago.filter(|ago| *ago < facts.lease) {
        return Err(ClaimRefused::HearsLeader { ago_ms: ago.as_millis() as u64 });
    }
    let ours = facts.last_log.unwrap_or(RegistryPosition { term: 0, index: 0 });
    if theirs <= ours {
        return Err(ClaimRefused::NotNewer { theirs, ours });
    }
    Ok(())
}

impl Registry {
    /// The position of this node's applied registry when it records node `id` as removed; a
    /// removed node that gossips to this one is answered with it.
    pub fn removed_at(&self, id: NodeId) -> Option<RegistryPosition> {
        let removed = self.state().node(id).is_some_and(|n| n.state == NodeState::Removed);
        if !removed {
            return None;
        }
        let applied = self.raft.metrics().borrow().last_applied?;
        Some(RegistryPosition { term: applied.leader_id.term, index: applied.index })
    }

    /// Whether this node believes `claimant`, whose applied registry at `theirs` records this
    /// node as removed (see the module's notes for the rules).
    pub fn judge_removal_claim(
        &self,
        claimant: NodeId,
        theirs: RegistryPosition,
    ) -> Result<(), ClaimRefused> {
        let state = self.state();
        let member = |id| state.node(id).is_some_and(|n| n.state != NodeState::Removed);
        let last_log = self
            .raft
            .data_metrics()
            .borrow()
            .last_log
            .map(|l| RegistryPosition { term: l.leader_id.term, index: l.index });
        let facts = Facts {
            removed: state.node(self.id).is_some_and(|n| n.state == NodeState::Removed),
            claimant_member: member(claimant),
            leading: self.raft.metrics().borrow().current_leader == Some(self.id),
            leader_heard_ago: self.heard.leader_ago(),
            lease: self.config.election_timing().lease,
            last_log,
        };
        judge(facts, claimant, theirs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(term: u64, index: u64) -> RegistryPosition {
        RegistryPosition { term, index }
    }

    /// A node removed while it was down: member claimant, no leader heard, a short log.
    fn returning() -> Facts {
        Facts {
            removed: false,
            claimant_member: true,
            leading: false,
            leader_heard_ago: None,
            lease: Duration::from_secs(2),
            last_log: Some(at(3, 40)),
        }
    }

    // Goal: a node removed while it was away believes a member whose registry is newer than its
    // log; every other claim is refused with its reason: from a stale peer (same or older
    // position, or a longer log of an older term), from a node it does not know, while it
    // leads, while it hears a leader, or when it already applied its own removal.
    #[test]
    fn only_a_newer_member_convinces_a_node_out_of_touch() {
        assert_eq!(judge(returning(), 2, at(3, 41)), Ok(()));
        assert_eq!(judge(returning(), 2, at(4, 12)), Ok(()), "a later term with a shorter log");
        assert_eq!(
            judge(returning(), 2, at(3, 40)),
            Err(ClaimRefused::NotNewer { theirs: at(3, 40), ours: at(3, 40) })
        );
        assert_eq!(
            judge(returning(), 2, at(2, 90)),
            Err(ClaimRefused::NotNewer { theirs: at(2, 90), ours: at(3, 40) }),
            "a longer log of an older term is stale"
        );
        let empty = Facts { last_log: None, ..returning() };
        assert_eq!(judge(empty, 2, at(1, 1)), Ok(()));
        let stranger = Facts { claimant_member: false, ..returning() };
        assert_eq!(judge(stranger, 9, at(9, 99)), Err(ClaimRefused::UnknownClaimant(9)));
        let leading = Facts { leading: true, ..returning() };
        assert_eq!(judge(leading, 2, at(9, 99)), Err(ClaimRefused::Leading));
        let following = Facts { leader_heard_ago: Some(Duration::from_millis(300)), ..returning() };
        assert_eq!(judge(following, 2, at(9, 99)), Err(ClaimRefused::HearsLeader { ago_ms: 300 }));
        let long_ago = Facts { leader_heard_ago: Some(Duration::from_secs(2)), ..returning() };
        assert_eq!(judge(long_ago, 2, at(9, 99)), Ok(()), "a leader heard a lease ago or more");
        let applied = Facts { removed: true, ..returning() };
        assert_eq!(judge(applied, 2, at(9, 99)), Err(ClaimRefused::AlreadyApplied));
    }
}
