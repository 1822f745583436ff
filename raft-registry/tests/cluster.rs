//! In-process clusters over an in-memory transport: election, replication, failover, restart,
//! and membership changes under load.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::task::JoinHandle;

use common::*;
use raft_registry::{key_hash, Command, NodeState, RegistryError, Rejection};

async fn three_nodes() -> anyhow::Result<Cluster> {
    let mut c = Cluster::new(test_config())?;
    c.bootstrap().await?;
    c.join(2).await?;
    c.join(3).await?;
    Ok(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_commit_and_replicate() -> anyhow::Result<()> {
    // Goal: a bootstrapped node plus two joins form a 3-voter cluster with one leader; a tenant
    // written on the leader reaches the followers; a follower refuses writes with the leader's
    // id and address; a used node id is refused; the epoch counts activations.
    bounded_test(async {
        let c = three_nodes().await?;
        let leader = c.leader(&[]).await?;
        let status = c.node(leader)?.status();
        assert_eq!(status.voters, vec![1, 2, 3]);
        assert!(status.learners.is_empty());

        let done = c.node(leader)?.write(add_tenant("acme")).await?;
        assert_eq!(done.placement_epoch, 3, "three activations");
        for id in [1, 2, 3] {
            let seen = applied(&*c.node(id)?, done.log_index).await?;
            let t = seen.tenant_by_key_hash(&key_hash("pmb-v1-key-of-acme")).map(|t| t.id.clone());
            assert_eq!(t.as_deref(), Some("acme"), "node {id}");
            assert_eq!(seen.active_nodes(), vec![1, 2, 3]);
            assert!(seen.owner_of("acme").is_some());
        }

        let follower = [1, 2, 3].into_iter().find(|id| *id != leader).expect("two followers");
        match c.node(follower)?.write(add_tenant("other")).await {
            Err(RegistryError::NotLeader { leader_id, leader_addr }) => {
                assert_eq!(leader_id, Some(leader));
                assert_eq!(leader_addr, Some(addr(leader)));
            }
            other => panic!("follower write: {other:?}"),
        }
        assert!(matches!(
            c.node(follower)?.read_linearizable().await,
            Err(RegistryError::NotLeader { .. })
        ));
        let reused = c.node(leader)?.join_node(2, "10.9.9.9:7000".into()).await;
        assert!(
            matches!(reused, Err(RegistryError::Rejected(Rejection::NodeIdUsed(2)))),
            "{reused:?}"
        );
        let dup = c.write(add_tenant("acme")).await?;
        assert!(matches!(dup, Err(RegistryError::Rejected(Rejection::TenantExists))), "{dup:?}");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_stop_elects_new_leader_without_loss() -> anyhow::Result<()> {
    // Goal: stopping the leader yields a new leader among the other two, which holds every
    // acknowledged tenant and accepts new writes.
    bounded_test(async {
        let mut c = three_nodes().await?;
        for i in 0..15 {
            c.write(add_tenant(&format!("t{i}"))).await??;
        }
        let old = c.leader(&[]).await?;
        c.stop(old).await?;
        let new = c.leader(&[]).await?;
        assert_ne!(new, old);
        let state = c.read().await?;
        for i in 0..15 {
            assert!(state.tenant(&format!("t{i}")).is_some(), "t{i} lost after failover");
        }
        c.write(add_tenant("after-failover")).await??;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_leader_hands_the_registry_to_the_most_caught_up_voter() -> anyhow::Result<()> {
    // Goal: draining the leader commits the drain, then hands leadership to the most caught-up
    // other voter, the lowest id among equals: a known node in one more term, where an election
    // after a failure picks a random winner, after a lease and a random delay. A write sent to
    // the old leader during the hand-over either commits first or is held and then answered
    // NotLeader; none is lost. A follower asked to transfer has nothing to hand over, and a
    // drain asked again succeeds without a change.
    bounded_test(async {
        let c = three_nodes().await?;
        for i in 0..10 {
            c.write(add_tenant(&format!("t{i}"))).await??;
        }
        let old = c.leader(&[]).await?;
        let term = c.node(old)?.status().term;
        let expected = [1, 2, 3].into_iter().find(|id| *id != old).expect("two followers");
        let follower = [1, 2, 3].into_iter().rfind(|id| *id != old).expect("two followers");
        assert_eq!(c.node(follower)?.transfer_leadership().await?, None);

        let drain = {
            let reg = c.node(old)?;
            tokio::spawn(async move { reg.drain_node(old).await })
        };
        let racing = c.node(old)?.write(add_tenant("racing")).await;
        drain.await??;
        match racing {
            Ok(_) => {}
            Err(RegistryError::NotLeader { .. }) => {
                c.write(add_tenant("racing")).await??;
            }
            Err(e) => panic!("a write racing the hand-over: {e}"),
        }
        let new = c.leader(&[]).await?;
        assert_eq!(new, expected, "the lowest-id caught-up voter leads");
        c.node(new)?.drain_node(old).await?; // asked again (a gateway re-sent it): done already
        assert_eq!(c.node(new)?.status().term, term + 1, "one election, won at once");
        let state = c.read().await?;
        assert_eq!(state.node(old).map(|n| n.state), Some(NodeState::Draining));
        for i in 0..10 {
            assert!(state.tenant(&format!("t{i}")).is_some(), "t{i} lost in the hand-over");
        }
        assert!(state.tenant("racing").is_some(), "the racing write was lost");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_leader_is_replaced_and_catches_up() -> anyhow::Result<()> {
    // Goal: a partitioned leader cannot commit; the majority elects a new leader and commits;
    // after healing, the old leader follows and applies what it missed.
    bounded_test(async {
        let c = three_nodes().await?;
        let old = c.leader(&[]).await?;
        c.net.partition(old, true);
        let cut_write = c.node(old)?.write(add_tenant("lost")).await;
        assert!(cut_write.is_err(), "a cut-off leader must not acknowledge: {cut_write:?}");
        let new = c.leader(&[old]).await?;
        assert_ne!(new, old);
        let done = c.node(new)?.write(add_tenant("majority")).await?;
        c.net.partition(old, false);
        let seen = applied(&*c.node(old)?, done.log_index).await?;
        assert!(seen.tenant("majority").is_some());
        assert_eq!(c.leader(&[]).await?, new, "the healed node follows the new leader");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_restart_keeps_tenants_membership_and_snapshots() -> anyhow::Result<()> {
    // Goal: after all three nodes stop and reopen from their directories, the cluster elects a
    // leader and still holds every tenant, the admin key hash, and the 3-voter membership —
    // including state that lives only in snapshots (the log is purged past them); a node that
    // joins afterwards catches up by snapshot.
    bounded_test(async {
        let mut c = three_nodes().await?;
        for i in 0..60 {
            c.write(add_tenant(&format!("r{i}"))).await??;
        }
        c.write(Command::SetAdminKeyHash { hash: key_hash("admin") }).await??;
        for id in [1, 2, 3] {
            let purged =
                poll("a snapshot and a purged log", || c.node(id).ok()?.status().purged_index)
                    .await?;
            println!("node {id}: log purged up to {purged}");
        }
        let term_before = c.node(1)?.status().term;
        for id in [1, 2, 3] {
            c.stop(id).await?;
        }
        // The seed node restarting alone (no quorum) still bootstraps at once from local state.
        let lone = c.start(1).await?;
        assert_eq!(lone.state().tenant_count(), 60, "committed state is back before any election");
        lone.bootstrap(addr(1), 1).await?;
        for id in [2, 3] {
            c.start(id).await?;
        }
        let leader = c.leader(&[]).await?;
        assert_eq!(c.node(leader)?.status().voters, vec![1, 2, 3]);
        assert!(c.node(1)?.status().term >= term_before, "the vote (term) survived the restart");
        let state = c.read().await?;
        assert_eq!(state.tenant_count(), 60);
        assert_eq!(state.admin_key_hash(), Some(key_hash("admin").as_str()));
        assert_eq!(state.active_nodes(), vec![1, 2, 3]);
        assert!(std::fs::metadata(c.dir(1).join("snapshot")).is_ok(), "a snapshot was written");
        c.write(add_tenant("after-restart")).await??;
        // bootstrap on a formed cluster is a no-op.
        c.node(1)?.bootstrap(addr(1), 1).await?;
        assert_eq!(c.read().await?.active_nodes(), vec![1, 2, 3]);
        // A new node can only catch up by snapshot now (the log is purged): InstallSnapshot
        // travels over the transport too.
        c.join(4).await?;
        let done = c.write(add_tenant("after-join")).await??;
        let seen = applied(&*c.node(4)?, done.log_index).await?;
        assert_eq!(seen.tenant_count(), 62, "60 + after-restart + after-join");
        assert!(c.node(4)?.status().snapshot_index.is_some(), "node 4 installed a snapshot");
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_node_starts_from_its_snapshot_alone() -> anyhow::Result<()> {
    // Goal: a node stopped cleanly (`close`) snapshots what it applied past its last snapshot
    // and drops the log that snapshot covers, so it reopens with everything from the snapshot
    // and no log to apply; it then follows the cluster's next writes.
    bounded_test(async {
        let mut c = three_nodes().await?;
        let leader = c.leader(&[]).await?;
        let follower = if leader == 2 { 3 } else { 2 };
        let mut last = 0;
        // Past the first snapshot (20 entries in tests; the joins made about 12) and short of the
        // next, so the log holds entries no snapshot covers.
        for i in 0..15 {
            last = c.write(add_tenant(&format!("c{i}"))).await??.log_index;
        }
        let before = applied(&*c.node(follower)?, last).await?;
        // Raft's metrics follow the published state: wait until they name the last write too.
        let node = c.node(follower)?;
        let reached = || node.status().last_applied_index.filter(|i| *i >= last);
        let applied_index = poll("the follower's metrics", reached).await?;
        let status = node.status();
        drop(node);
        assert!(status.snapshot_index < Some(applied_index), "a tail no snapshot covers");
        c.close(follower).await?;
        let reopened = c.start(follower).await?;
        // Raft publishes its metrics once it has started.
        poll("the reopened node's metrics", || reopened.status().snapshot_index).await?;
        let status = reopened.status();
        assert_eq!(status.snapshot_index, Some(applied_index), "the closing snapshot");
        assert_eq!(status.purged_index, Some(applied_index), "the log it covers is gone");
        assert_eq!(status.last_applied_index, Some(applied_index));
        assert_eq!(reopened.state().tenant_count(), before.tenant_count());
        assert_eq!(reopened.state().tenant_count(), 15);
        let done = c.write(add_tenant("after-close")).await??;
        let seen = applied(&*c.node(follower)?, done.log_index).await?;
        assert!(seen.tenant_by_key_hash(&key_hash("pmb-v1-key-of-after-close")).is_some());
        Ok(())
    })
    .await
}

/// Adds tenants w0, w1, ... until `stop`; returns the ids whose write was acknowledged.
fn spawn_writer(c: Arc<Cluster>, stop: Arc<AtomicBool>) -> JoinHandle<anyhow::Result<Vec<String>>> {
    tokio::spawn(async move {
        let mut acked = Vec::new();
        for i in 0.. {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let id = format!("w{i}");
            match c.write(add_tenant(&id)).await? {
                // TenantExists: an earlier attempt timed out but committed.
                Ok(_) | Err(RegistryError::Rejected(Rejection::TenantExists)) => acked.push(id),
                Err(e) => anyhow::bail!("write {id}: {e}"),
            }
        }
        Ok(acked)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_and_remove_while_writing() -> anyhow::Result<()> {
    // Goal: while a writer keeps adding tenants, node 4 joins and then the current leader is
    // drained (handing leadership over) and removed; every acknowledged tenant survives, the
    // three others end as voters, the epoch grows on each change, and the removed id can never
    // join again.
    bounded_test(async {
        let mut c = three_nodes().await?;
        c.start(4).await?;
        let c = Arc::new(c);
        let stop = Arc::new(AtomicBool::new(false));
        let writer = spawn_writer(c.clone(), stop.clone());
        let epoch_before = c.read().await?.placement_epoch();
        let leader = c.leader(&[]).await?;
        c.node(leader)?.join_node(4, addr(4)).await?;
        // The node layer moves the tenants' data; here the handoffs are simply declared done.
        finish_handoffs(&c).await?;
        let removed = c.leader(&[]).await?;
        c.node(removed)?.drain_node(removed).await?;
        finish_handoffs(&c).await?;
        // The drained leader handed the registry over; the new leader removes it.
        let leader = c.leader(&[]).await?;
        assert_ne!(leader, removed, "a drained leader hands leadership over");
        c.node(leader)?.remove_node(removed).await?;
        c.write(add_tenant("after-removal")).await??;
        stop.store(true, Ordering::Relaxed);
        let acked = writer.await??;
        assert!(!acked.is_empty(), "the writer made progress during the changes");

        let state = c.node(leader)?.read_linearizable().await?;
        for id in &acked {
            assert!(state.tenant(id).is_some(), "acknowledged tenant {id} lost");
        }
        let rest: Vec<u64> = [1, 2, 3, 4].into_iter().filter(|id| *id != removed).collect();
        assert_eq!(state.placement_epoch(), epoch_before + 2, "join and drain each bump the epoch");
        assert_eq!(state.node(removed).map(|n| n.state), Some(NodeState::Removed));
        assert_eq!(state.active_nodes(), rest);
        assert_eq!(c.node(leader)?.status().voters, rest);
        let again = c.node(leader)?.join_node(removed, addr(removed)).await;
        assert!(
            matches!(again, Err(RegistryError::Rejected(Rejection::NodeIdUsed(_)))),
            "{again:?}"
        );
        println!(
            "join/remove under load: {} tenants acknowledged, leader {removed} drained and removed",
            acked.len()
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_finishes_a_removal_whose_membership_change_never_ran() -> anyhow::Result<()> {
    // Goal: a node recorded as removed but still a Raft voter (its removal stopped between the
    // two steps) is listed as an unfinished removal; a follower's `finish_removals` does
    // nothing, the leader's takes it out of the membership, after which none is left and
    // the registry still commits.
    bounded_test(async {
        let mut c = three_nodes().await?;
        let leader = c.leader(&[]).await?;
        let gone = [1, 2, 3].into_iter().find(|id| *id != leader).expect("two followers");
        c.node(leader)?.drain_node(gone).await?;
        finish_handoffs(&c).await?;
        // Only the registry's step of the removal, as a leader that stopped after it leaves.
        let done = c.write(Command::NodeRemove { id: gone }).await??;
        c.stop(gone).await?;
        let leader = c.leader(&[gone]).await?;
        let follower = [1, 2, 3].into_iter().find(|id| *id != leader && *id != gone).expect("one");
        applied(&*c.node(follower)?, done.log_index).await?;
        applied(&*c.node(leader)?, done.log_index).await?;
        assert_eq!(c.node(leader)?.removals_unfinished(), vec![gone]);
        assert!(c.node(leader)?.status().voters.contains(&gone), "still a voter");

        c.node(follower)?.finish_removals().await?;
        assert!(c.node(leader)?.status().voters.contains(&gone), "a follower changes nothing");
        c.node(leader)?.finish_removals().await?;
        let rest: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != gone).collect();
        assert_eq!(c.node(leader)?.status().voters, rest);
        assert!(c.node(leader)?.removals_unfinished().is_empty());
        c.write(add_tenant("after")).await??;
        Ok(())
    })
    .await
}

/// A one-node cluster whose joins give up on a learner that does not catch up within 2 s.
async fn bootstrapped_with_short_catchup() -> anyhow::Result<Cluster> {
    let config =
        raft_registry::RegistryConfig { learner_catchup_timeout_ms: 2_000, ..test_config() };
    let mut c = Cluster::new(config)?;
    c.bootstrap().await?;
    Ok(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_membership_change_is_refused() -> anyhow::Result<()> {
    // Goal: while one join is in progress (a node that never answers), a second membership change
    // is refused with MembershipChangeInProgress; the stuck join times out and the half-joined
    // node can then be removed.
    bounded_test(async {
        let c = bootstrapped_with_short_catchup().await?;
        let leader = c.node(1)?;
        let stuck = tokio::spawn({
            let leader = leader.clone();
            async move { leader.join_node(9, addr(9)).await }
        });
        poll("join of node 9 recorded", || leader.state().node(9).map(|_| ())).await?;
        let second = leader.join_node(10, addr(10)).await;
        assert!(matches!(second, Err(RegistryError::MembershipChangeInProgress)), "{second:?}");
        let stuck = stuck.await?;
        assert!(matches!(stuck, Err(RegistryError::Timeout { .. })), "{stuck:?}");
        leader.remove_node(9).await?;
        let state = leader.read_linearizable().await?;
        assert_eq!(state.node(9).map(|n| n.state), Some(NodeState::Removed));
        assert!(!leader.status().learners.contains(&9));
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_joining_node_cancels_its_join() -> anyhow::Result<()> {
    // Goal: a join whose node never answers does not wedge membership: removing that node
    // cancels the join at once (long before the catch-up timeout), drops its learner, retires
    // the id, and the next join proceeds.
    bounded_test(async {
        let mut c = Cluster::new(test_config())?;
        c.bootstrap().await?;
        let leader = c.node(1)?;
        let stuck = tokio::spawn({
            let leader = leader.clone();
            async move { leader.join_node(9, addr(9)).await }
        });
        poll("node 9 a learner", || leader.status().learners.contains(&9).then_some(())).await?;
        let started = std::time::Instant::now();
        leader.remove_node(9).await?;
        let took = started.elapsed();
        assert!(
            took < std::time::Duration::from_millis(test_config().learner_catchup_timeout_ms),
            "the removal waited out the join: {took:?}"
        );
        let stuck = stuck.await?;
        assert!(matches!(stuck, Err(RegistryError::JoinCancelled(9))), "{stuck:?}");
        let state = leader.read_linearizable().await?;
        assert_eq!(state.node(9).map(|n| n.state), Some(NodeState::Removed));
        let status = leader.status();
        assert!(!status.learners.contains(&9) && !status.voters.contains(&9), "{status:?}");
        c.join(2).await?;
        assert_eq!(c.node(1)?.status().voters, vec![1, 2]);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_added_at_another_nodes_address_never_votes() -> anyhow::Result<()> {
    // Goal: `join_node(9, <node 2's address>)` must not let node 2 answer for id 9 (it would then
    // vote and acknowledge twice). Node 2 refuses Raft messages addressed to 9, so the join times
    // out with 9 a learner that never caught up; the three voters stay, writes go on, and 9 can
    // be removed.
    bounded_test(async {
        let mut c = bootstrapped_with_short_catchup().await?;
        c.join(2).await?;
        c.join(3).await?;
        c.net.alias(9, 2);
        let leader = c.leader(&[]).await?;
        let joined = c.node(leader)?.join_node(9, addr(2)).await;
        assert!(matches!(joined, Err(RegistryError::Timeout { .. })), "{joined:?}");
        let status = c.node(leader)?.status();
        assert_eq!(status.voters, vec![1, 2, 3]);
        let done = c.write(add_tenant("after-bad-join")).await??;
        assert!(done.log_index > 0);
        c.node(leader)?.remove_node(9).await?;
        let state = c.node(leader)?.read_linearizable().await?;
        assert_eq!(state.node(9).map(|n| n.state), Some(NodeState::Removed));
        assert_eq!(state.active_nodes(), vec![1, 2, 3]);
        Ok(())
    })
    .await
}

/// Declares every pending handoff done, as the nodes would once each tenant's data arrived.
async fn finish_handoffs(c: &common::Cluster) -> anyhow::Result<()> {
    let state = c.read().await?;
    for h in state.handoffs() {
        c.write(Command::HandoffDone { tenant: h.tenant.clone(), epoch: h.epoch }).await??;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_log_entries() -> anyhow::Result<()> {
    // Goal: writes proposed together are committed in fewer log entries than writes, each with
    // its own outcome (a duplicate is refused alone, the rest of its batch applies); every node
    // applies them all and its change log names exactly the tenants added.
    bounded_test(async {
        let c = three_nodes().await?;
        let leader = c.node(c.leader(&[]).await?)?;
        let before = leader.subscribe().borrow().0;
        leader.write(add_tenant("dup")).await?;
        let mut commands: Vec<Command> = (0..40).map(|i| add_tenant(&format!("t{i:02}"))).collect();
        commands.insert(20, add_tenant("dup"));
        let outcomes = leader.write_all(commands).await;
        assert_eq!(outcomes.len(), 41);
        let dup = &outcomes[20];
        assert!(matches!(dup, Err(RegistryError::Rejected(Rejection::TenantExists))), "{dup:?}");
        let mut indexes: Vec<u64> = outcomes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 20)
            .map(|(_, o)| o.as_ref().map(|r| r.log_index).map_err(|e| anyhow::anyhow!("{e}")))
            .collect::<anyhow::Result<_>>()?;
        indexes.dedup();
        assert!(indexes.len() < 40, "40 writes in {} entries", indexes.len());
        let last = *indexes.last().expect("40 writes");
        for id in [1, 2, 3] {
            let node = c.node(id)?;
            let seen = applied(&node, last).await?;
            assert_eq!(seen.tenant_count(), 41, "node {id}");
            let mut want: std::collections::BTreeSet<String> =
                (0..40).map(|i| format!("t{i:02}")).collect();
            want.insert("dup".into());
            assert_eq!(node.changes_since(before, last), raft_registry::Since::Tenants(want));
        }
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn two_voters_restarted_in_one_instant_elect_a_leader() -> anyhow::Result<()> {
    // Goal: the two surviving voters of three, restarted in the same instant (their timers in
    // step), elect a leader within a few election rounds, whatever the election-timeout draws.
    // A timeout drawn once per process, checked on a shared tick, let such a pair stand as
    // candidates together after every failed round and split the vote forever.
    for seed in 0..8 {
        raft_registry::runtime::seed_thread_rng(seed);
        let mut c = three_nodes().await?;
        c.write(add_tenant("before")).await??;
        let old = c.leader(&[]).await?;
        c.stop(old).await?;
        let survivors: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != old).collect();
        for &id in &survivors {
            c.stop(id).await?;
        }
        for &id in &survivors {
            c.start(id).await?;
        }
        let restarted = tokio::time::Instant::now();
        let new = c.leader(&[]).await?;
        let waited = restarted.elapsed();
        assert!(survivors.contains(&new), "seed {seed}: node {new} leads");
        assert!(
            waited < std::time::Duration::from_secs(10),
            "seed {seed}: a leader after {waited:?}"
        );
        assert!(c.read().await?.tenant("before").is_some(), "seed {seed}");
    }
    Ok(())
}
