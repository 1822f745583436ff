//! Membership changes, one at a time: join (learner first, then voter) and removal.
//!
//! Raft membership (who votes) and the registry's node records (who owns tenants) change in
//! lockstep, each step committed before the next, so an interrupted change can be resumed by
//! calling the same operation again. Node ids are never reused.

use std::collections::BTreeSet;
use std::sync::Arc;

use openraft::{BasicNode, ChangeMembers};

use crate::command::{Command, Rejection};
use crate::error::RegistryError;
use crate::registry::{bounded, Registry};
use crate::state::NodeState;

impl Registry {
    /// Adds node `id` at `addr` to the cluster. Run on the leader:
    /// 1. commit `NodeJoin` (state Joining; refused if the id was ever used),
    /// 2. add it as a Raft learner and wait until it has replicated the log,
    /// 3. promote it to voter,
    /// 4. commit `NodeActivate` (placement epoch + 1).
    ///
    /// Calling it again for a node still `Joining` at the same address resumes an interrupted
    /// join; for a node already `Active` at that address it is a no-op.
    pub async fn join_node(&self, id: u64, addr: String) -> Result<(), RegistryError> {
        let _one_change = self
            .membership_lock
            .try_lock()
            .map_err(|_| RegistryError::MembershipChangeInProgress)?;
        let state = self.read_linearizable().await?;
        match state.node(id) {
            None => {
                self.write(Command::NodeJoin { id, addr: addr.clone() }).await?;
            }
            Some(n)
                if n.addr == addr && matches!(n.state, NodeState::Joining | NodeState::Active) => {}
            Some(_) => return Err(Rejection::NodeIdUsed(id).into()),
        }
        let cancel = Arc::new(tokio::sync::Notify::new());
        *self.joining.lock().unwrap_or_else(|p| p.into_inner()) = Some((id, cancel.clone()));
        let joined = tokio::select! {
            r = self.catch_up_and_promote(id, addr) => r,
            _ = cancel.notified() => Err(RegistryError::JoinCancelled(id)),
        };
        *self.joining.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if let Err(e) = joined {
            // A learner that never catches up must not stay in the membership: the leader would
            // replicate to it forever. The record stays Joining: the same join resumes it, and a
            // removal retires the id.
            self.drop_learner(id).await;
            tracing::warn!(id, error = %e, "join did not finish; the learner was dropped");
            return Err(e);
        }
        Ok(())
    }

    async fn catch_up_and_promote(&self, id: u64, addr: String) -> Result<(), RegistryError> {
        self.add_caught_up_learner(id, addr).await?;
        let promote =
            self.raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false);
        bounded("promote to voter", self.config.membership_change_timeout(), promote).await??;
        if self.read_linearizable().await?.node(id).map(|n| n.state) == Some(NodeState::Joining) {
            self.write(Command::NodeActivate { id }).await?;
        }
        Ok(())
    }

    /// Takes `id` out of the Raft membership if it is a learner there (never a voter).
    async fn drop_learner(&self, id: u64) {
        let membership = self.raft.metrics().borrow().membership_config.membership().clone();
        let is_learner = membership.learner_ids().any(|l| l == id);
        if !is_learner {
            return;
        }
        let change =
            self.raft.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false);
        if let Err(e) =
            bounded("drop learner", self.config.membership_change_timeout(), change).await
        {
            tracing::warn!(id, error = %e, "could not drop the learner of an unfinished join");
        }
    }

    /// Adds `id` as a learner and waits until it has replicated the whole log as of now.
    ///
    /// openraft's blocking `add_learner` counts a learner as caught up when its lag is under
    /// `replication_lag_threshold`, which a short log always is, even for a node that never
    /// answered. Promoting such a node to voter would wedge the joint config without a quorum, so
    /// we wait for its matched log index in the leader's replication metrics instead.
    async fn add_caught_up_learner(&self, id: u64, addr: String) -> Result<(), RegistryError> {
        let limit = self.config.learner_catchup_timeout();
        let added =
            bounded("add learner", limit, self.raft.add_learner(id, BasicNode::new(addr), false))
                .await??;
        let target = added.log_id.index;
        let caught_up = self
            .raft
            .wait(Some(limit))
            .metrics(
                |m| {
                    let matched =
                        m.replication.as_ref().and_then(|r| r.get(&id)).copied().flatten();
                    matched.is_some_and(|l| l.index >= target)
                },
                "learner caught up",
            )
            .await;
        caught_up.map(|_| ()).map_err(|e| match e {
            openraft::metrics::WaitError::Timeout(..) => {
                RegistryError::timeout("learner catch-up", limit)
            }
            openraft::metrics::WaitError::ShuttingDown => RegistryError::Shutdown,
        })
    }

    /// Takes an active node out of the ring (one placement change): its tenants get handoffs to
    /// their new owners, and it can be removed once they are done. Run on the leader. When the
    /// drained node is this leader, it then hands leadership to the most caught-up other voter
    /// ([`Registry::transfer_leadership`]), so that stopping or removing it later costs the
    /// registry no election. The drain stands whether or not the transfer succeeds. Draining a
    /// node that is draining already changes nothing and succeeds.
    pub async fn drain_node(&self, id: u64) -> Result<(), RegistryError> {
        let _one_change = self
            .membership_lock
            .try_lock()
            .map_err(|_| RegistryError::MembershipChangeInProgress)?;
        // A drain asked again (a gateway that re-sent it to the new leader after a hand-over)
        // is done already.
        let state = self.read_linearizable().await?;
        if state.node(id).map(|n| n.state) != Some(NodeState::Draining) {
            self.write(Command::NodeDrain { id }).await?;
        }
        if id == self.id {
            match self.transfer_leadership().await {
                Ok(Some(to)) => tracing::info!(to, "drained leader handed the registry over"),
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "drained leader could not hand over"),
            }
        }
        Ok(())
    }

    /// Hands leadership to the most caught-up other voter ([`crate::transfer`]): new writes wait
    /// until it is done, about one election round trip once this node has led for a lease.
    /// Returns the new leader, or `None` when this node does not lead or is the only voter.
    pub async fn transfer_leadership(&self) -> Result<Option<u64>, RegistryError> {
        crate::transfer::run(self).await
    }

    /// Removes node `id` for good. Run on the leader:
    /// 1. commit `NodeRemove` (placement epoch + 1 if it was Active; refused for the last active
    ///    node) so placement stops using it,
    /// 2. drop it from the Raft membership (voter or learner).
    ///
    /// The registry step comes first so that a leader can remove itself: it stays leader until
    /// the membership without it commits, then steps down. Calling it again resumes an
    /// interrupted removal. Drain the node (`NodeDrain`) first to hand its tenants off (and, for
    /// the leader, the registry).
    pub async fn remove_node(&self, id: u64) -> Result<(), RegistryError> {
        // Removing a node whose join is still running cancels that join, then waits for it to
        // let go: a join that never finishes can always be undone.
        let cancels_join = {
            let joining = self.joining.lock().unwrap_or_else(|p| p.into_inner());
            joining.as_ref().filter(|(j, _)| *j == id).map(|(_, c)| c.clone())
        };
        let _one_change = match cancels_join {
            Some(cancel) => {
                cancel.notify_one();
                let limit = self.config.membership_change_timeout();
                bounded("cancel the join", limit, self.membership_lock.lock()).await?
            }
            None => self
                .membership_lock
                .try_lock()
                .map_err(|_| RegistryError::MembershipChangeInProgress)?,
        };
        let state = self.read_linearizable().await?;
        let node = state.node(id).ok_or(Rejection::NoSuchNode(id))?;
        if node.state != NodeState::Removed {
            self.write(Command::NodeRemove { id }).await?;
        }
        self.drop_from_membership(id).await
    }

    /// Takes `id` out of the Raft membership (a voter or a learner); nothing if it is not in it.
    /// The caller holds the membership lock.
    async fn drop_from_membership(&self, id: u64) -> Result<(), RegistryError> {
        let membership = self.raft.metrics().borrow().membership_config.membership().clone();
        let ids = BTreeSet::from([id]);
        let change = if membership.voter_ids().any(|v| v == id) {
            ChangeMembers::RemoveVoters(ids)
        } else if membership.get_node(&id).is_some() {
            ChangeMembers::RemoveNodes(ids)
        } else {
            return Ok(());
        };
        let remove = self.raft.change_membership(change, false);
        bounded("remove from membership", self.config.membership_change_timeout(), remove)
            .await??;
        Ok(())
    }

    /// The nodes the registry records as removed that are still in the Raft membership: a
    /// removal whose second step (the membership change) did not complete. Such a node has
    /// applied its removal and stopped for good, yet still counts as a voter, so every majority
    /// needs one node more than is left to give it.
    pub fn removals_unfinished(&self) -> Vec<u64> {
        let membership = self.raft.metrics().borrow().membership_config.membership().clone();
        self.state()
            .nodes()
            .filter(|n| n.state == NodeState::Removed && membership.get_node(&n.id).is_some())
            .map(|n| n.id)
            .collect()
    }

    /// On the leader, finishes every unfinished removal ([`Self::removals_unfinished`]), one
    /// membership change at a time; does nothing elsewhere, with none unfinished, or while
    /// another membership change runs (it is tried again at the next call).
    pub async fn finish_removals(&self) -> Result<(), RegistryError> {
        if !self.status().is_leader {
            return Ok(());
        }
        let unfinished = self.removals_unfinished();
        if unfinished.is_empty() {
            return Ok(());
        }
        // A removal that finished meanwhile leaves nothing to take out: `drop_from_membership`
        // reads the membership again.
        let Ok(_one_change) = self.membership_lock.try_lock() else { return Ok(()) };
        for id in unfinished {
            tracing::warn!(id, "a removed node is still in the Raft membership; taking it out");
            self.drop_from_membership(id).await?;
        }
        Ok(())
    }
}
