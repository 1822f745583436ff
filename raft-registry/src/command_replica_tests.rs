//! The commands of a replicated cluster: R set and raised, nodes marked down and up, replica
//! sets changed by joins and drains, and a lost store.

use super::*;

#[test]
fn the_replication_factor_is_set_within_its_limits() {
    // Goal: R starts at 1, is set to 1..=REPLICAS_MAX, and 0 or more than the limit is refused
    // without change; with tenants it moves by one at a time, from 1 too (but not by the older command); each
    // tenant's replica set is the first R active nodes, owner first, and never more nodes than
    // are active.
    let mut s = RegistryState::default();
    assert_eq!(s.replicas(), 1);
    for id in 1..=4 {
        apply(&mut s, Command::NodeJoin { id, addr: format!("n{id}:1") }).expect("joins");
        apply(&mut s, Command::NodeActivate { id }).expect("activates");
    }
    check(
        &mut s,
        vec![
            (Command::ChangeReplicas { replicas: 0 }, Err(Rejection::InvalidReplicas)),
            (
                Command::ChangeReplicas { replicas: REPLICAS_MAX + 1 },
                Err(Rejection::InvalidReplicas),
            ),
            (Command::ChangeReplicas { replicas: 2 }, Ok(())),
            (new_tenant("acme", "k1"), Ok(())),
            (
                Command::ChangeReplicas { replicas: 4 },
                Err(Rejection::ReplicasChangedByMoreThanOne { from: 2, to: 4 }),
            ),
            (Command::ChangeReplicas { replicas: 1 }, Ok(())),
            // The command older builds proposed applies as it did: never a raise from 1.
            (Command::SetReplicas { replicas: 2 }, Err(Rejection::ReplicasRaisedFromOne(1))),
        ],
    );
    assert_eq!(s.replica_set("acme"), vec![s.owner_of("acme").expect("owned")]);
    // Raised from 1 as from any R: the one copy's node stays first, and the next node on the
    // ring enters the set under a new epoch (a change whose leaving node is the entering one).
    let (owner, epoch) = (s.owner_of("acme").expect("owned"), s.placement_epoch());
    check(&mut s, vec![(Command::ChangeReplicas { replicas: 2 }, Ok(()))]);
    let set = s.replica_set("acme");
    assert_eq!((set.len(), set[0]), (2, owner), "{set:?}");
    let h = s.handoff("acme").expect("the set's change is recorded").clone();
    assert_eq!((h.from, h.to, h.epoch), (set[1], set[1], epoch + 1), "{h:?}");
    assert_eq!(s.placement_epoch(), epoch + 1);
    assert_eq!(s.under_replicated(), 1, "its second copy is still entering");
    check(&mut s, vec![(Command::HandoffDone { tenant: "acme".into(), epoch: h.epoch }, Ok(()))]);
    assert_eq!(s.under_replicated(), 0);
    s.replicas = 3;
    let set = s.replica_set("acme");
    assert_eq!(set.len(), 3);
    assert_eq!(set[0], s.owner_of("acme").expect("owned"));
    assert_eq!(s.under_replicated(), 0);
    apply(&mut s, Command::MarkDown { id: set[1] }).expect("down");
    assert_eq!(s.under_replicated(), 1, "a backup down");
    assert_eq!(s.primary_of("acme"), Some(set[0]));
    apply(&mut s, Command::MarkDown { id: set[0] }).expect("down");
    assert_eq!(s.primary_of("acme"), Some(set[2]), "the first member not down serves");
    apply(&mut s, Command::MarkUp { id: set[0] }).expect("up");
    apply(&mut s, Command::MarkUp { id: set[1] }).expect("up");
    assert_eq!(s.under_replicated(), 0);
    s.replicas = REPLICAS_MAX;
    assert_eq!(s.replica_set("acme").len(), 4, "no more copies than active nodes");
}

#[test]
fn a_mark_decided_before_a_later_mark_is_rejected() {
    // Goal: a mark applies only while the node's latest mark is the one it was decided on. A
    // deposed leader's `MarkDownAfter`, decided before the new leader marked the node down and
    // up, reaches the log after both and is rejected, leaving the node up; one decided on the
    // current view applies.
    let mut s = RegistryState::default();
    for id in 1..=3 {
        apply(&mut s, Command::NodeJoin { id, addr: format!("n{id}:1") }).expect("joins");
        apply(&mut s, Command::NodeActivate { id }).expect("active");
    }
    let epoch = s.placement_epoch();
    check(
        &mut s,
        vec![
            (Command::MarkDownAfter { id: 1, last_mark: 0 }, Ok(())),
            (Command::MarkUpAfter { id: 1, last_mark: epoch + 1 }, Ok(())),
            (
                Command::MarkDownAfter { id: 1, last_mark: 0 },
                Err(Rejection::StaleMark { id: 1, decided: 0, now: epoch + 2 }),
            ),
            (
                Command::MarkUpAfter { id: 1, last_mark: epoch + 1 },
                Err(Rejection::StaleMark { id: 1, decided: epoch + 1, now: epoch + 2 }),
            ),
        ],
    );
    assert!(!s.is_down(1), "the stale mark left the node up");
    assert_eq!(s.placement_epoch(), epoch + 2, "a rejected mark moves no epoch");
    check(&mut s, vec![(Command::MarkDownAfter { id: 1, last_mark: epoch + 2 }, Ok(()))]);
    assert!(s.is_down(1));
    check(
        &mut s,
        vec![(
            Command::MarkDownAfter { id: 2, last_mark: 7 },
            Err(Rejection::StaleMark { id: 2, decided: 7, now: 0 }),
        )],
    );
}

#[test]
fn nodes_are_marked_down_and_up_once_each() {
    // Goal: only an active node that is not down can be marked down, only a down node marked up,
    // each mark bumping the placement epoch and leaving the ring as it was; removal forgets the
    // marks; a refused mark changes nothing.
    let mut s = RegistryState::default();
    for id in 1..=3 {
        apply(&mut s, Command::NodeJoin { id, addr: format!("n{id}:1") }).expect("joins");
    }
    check(
        &mut s,
        vec![
            (
                Command::MarkDown { id: 1 },
                Err(Rejection::InvalidNodeTransition {
                    id: 1,
                    from: NodeState::Joining,
                    to: NodeState::Active,
                }),
            ),
            (Command::MarkDown { id: 9 }, Err(Rejection::NoSuchNode(9))),
            (Command::NodeActivate { id: 1 }, Ok(())),
            (Command::NodeActivate { id: 2 }, Ok(())),
            (Command::MarkUp { id: 1 }, Err(Rejection::NotDown(1))),
        ],
    );
    let (epoch, ring) = (s.placement_epoch(), s.ring().node_ids().to_vec());
    check(&mut s, vec![(Command::MarkDown { id: 1 }, Ok(()))]);
    assert!(s.is_down(1) && !s.is_down(2));
    assert_eq!(s.liveness(1), Some(Liveness { down: true, epoch: epoch + 1 }));
    assert_eq!(s.ring().node_ids(), ring.as_slice(), "a down node keeps its place");
    check(
        &mut s,
        vec![
            (Command::MarkDown { id: 1 }, Err(Rejection::AlreadyDown(1))),
            (Command::MarkUp { id: 1 }, Ok(())),
        ],
    );
    assert_eq!(s.liveness(1), Some(Liveness { down: false, epoch: epoch + 2 }));
    check(
        &mut s,
        vec![
            (Command::MarkDown { id: 2 }, Ok(())),
            (Command::NodeDrain { id: 2 }, Ok(())),
            (Command::MarkUp { id: 2 }, Ok(())),
        ],
    );
    s.handoffs.clear();
    apply(&mut s, Command::MarkDown { id: 1 }).expect("down");
    apply(&mut s, Command::NodeRemove { id: 2 }).expect("removed");
    assert!(s.is_down(1));
    assert_eq!(s.liveness(2), None, "a removed node's marks go with it");
}

#[test]
fn with_three_replicas_a_join_or_drain_swaps_one_node_per_set() {
    // Goal: with R = 3, a join or a drain is accepted only with at least R (join) or more than
    // R (drain) active nodes; it records, for each tenant whose set changes, the node entering
    // and the node leaving. Until `HandoffDone`, the set holds both (R + 1 members, the leaving
    // node last) and the entering node is never primary; after it, the set is the ring's, and
    // the epoch moves only when the tenant's primary changed.
    let (mut s, tenants) = cluster_with_tenants(3, 3, 40);
    let drain_too_few = Rejection::TooFewNodesForReplicas { replicas: 3, active: 3 };
    check(&mut s, vec![(Command::NodeDrain { id: 1 }, Err(drain_too_few)), (join(4), Ok(()))]);
    let before: Vec<Vec<u64>> = tenants.iter().map(|t| s.replica_set(t)).collect();
    let epoch = s.placement_epoch();
    check(&mut s, vec![(Command::NodeActivate { id: 4 }, Ok(()))]);
    let changed: Vec<Handoff> = s.handoffs().cloned().collect();
    assert!(!changed.is_empty() && changed.len() < tenants.len(), "node 4 enters some sets");
    for (t, old) in tenants.iter().zip(&before) {
        let Some(h) = s.replica_change(t).cloned() else {
            assert_eq!(&s.replica_set(t), old, "{t}: an unchanged set");
            continue;
        };
        assert_eq!((h.to, h.epoch), (4, epoch + 1), "{t}");
        assert!(old.contains(&h.from) && !s.settled_set(t).contains(&h.from), "{t}: {h:?}");
        let during = s.replica_set(t);
        assert_eq!(during.len(), 4, "{t}: both the entering and the leaving node");
        assert_eq!(during.last(), Some(&h.from));
        assert_eq!(s.primary_of(t), Some(old[0]), "{t}: the entering node does not lead yet");
        let primary_after = s.settled_set(t)[0];
        let epoch_before = s.placement_epoch();
        apply(&mut s, Command::HandoffDone { tenant: t.clone(), epoch: h.epoch }).expect("done");
        assert_eq!(s.replica_set(t), s.settled_set(t));
        assert_eq!(s.primary_of(t), Some(primary_after));
        let moved = u64::from(primary_after != old[0]);
        assert_eq!(s.placement_epoch(), epoch_before + moved, "{t}: a new primary, a new ballot");
    }
    // A drain of more than R active nodes swaps the drained node out of every set it was in.
    check(&mut s, vec![(Command::NodeDrain { id: 2 }, Ok(()))]);
    assert!(s.handoffs().all(|h| h.from == 2 && h.to != 2));
    assert!(s.handoffs().count() > 0);
    let pending = s.handoffs().count();
    let lower = Command::ChangeReplicas { replicas: 2 };
    check(&mut s, vec![(lower, Err(Rejection::HandoffsPending(pending)))]);
}

#[test]
fn with_three_replicas_a_join_grows_sets_below_r() {
    // Goal: with R = 3 and fewer active nodes, a join adds the new node to every tenant's set
    // and takes none out (recorded with `from` = `to`): until it is done the set holds the new
    // node, which is not primary; after it, the set is unchanged and the epoch moves only if the
    // new node heads it. A drain that would leave R or fewer is refused.
    let mut s = RegistryState::default();
    apply(&mut s, join(1)).expect("joins");
    apply(&mut s, Command::NodeActivate { id: 1 }).expect("activates");
    apply(&mut s, Command::ChangeReplicas { replicas: 3 }).expect("R = 3");
    for i in 0..20 {
        apply(&mut s, new_tenant(&format!("t{i}"), &format!("k{i}"))).expect("adds");
    }
    for id in [2, 3] {
        check(&mut s, vec![(join(id), Ok(())), (Command::NodeActivate { id }, Ok(()))]);
        let changes: Vec<Handoff> = s.handoffs().cloned().collect();
        assert_eq!(changes.len(), 20, "node {id} enters every set");
        for h in changes {
            assert_eq!((h.from, h.to), (id, id), "{h:?}");
            let set = s.replica_set(&h.tenant);
            assert_eq!(set.len() as u64, id, "{set:?}");
            assert_eq!(set, s.settled_set(&h.tenant));
            assert_ne!(s.primary_of(&h.tenant), Some(id), "the entering node does not lead");
            let heads = set[0] == id;
            let epoch = s.placement_epoch();
            let done = Command::HandoffDone { tenant: h.tenant.clone(), epoch: h.epoch };
            apply(&mut s, done).expect("done");
            assert_eq!(s.placement_epoch(), epoch + u64::from(heads), "{h:?}");
            assert_eq!(s.primary_of(&h.tenant), Some(set[0]));
        }
    }
    let refused = Rejection::TooFewNodesForReplicas { replicas: 3, active: 3 };
    check(&mut s, vec![(Command::NodeDrain { id: 2 }, Err(refused))]);
}

#[test]
fn raising_r_with_tenants_grows_every_set_by_its_next_node() {
    // Goal: with tenants, raising R by one is a placement change that adds to every tenant's set
    // the next node on its ring and takes none out (recorded with `from` = `to`, under a new
    // epoch); until it is done the entering node is a member but not primary, and no other
    // change of R is taken; after it, each set is the ring's first R nodes and no primary moved.
    // With no node left to add, a raise records nothing and the tenants are under-replicated.
    let (mut s, tenants) = cluster_with_tenants(4, 2, 30);
    let before: Vec<Vec<u64>> = tenants.iter().map(|t| s.replica_set(t)).collect();
    let epoch = s.placement_epoch();
    check(&mut s, vec![(Command::ChangeReplicas { replicas: 3 }, Ok(()))]);
    assert_eq!(s.placement_epoch(), epoch + 1, "a new configuration, a new ballot");
    assert_eq!(s.handoffs().count(), tenants.len(), "every set grows");
    for (t, old) in tenants.iter().zip(&before) {
        let h = s.replica_change(t).cloned().expect("a change of the set");
        let settled = s.settled_set(t);
        assert_eq!((h.from, h.to, h.epoch), (settled[2], settled[2], epoch + 1), "{t}");
        assert_eq!(&settled[..2], &old[..], "{t}: the set keeps its nodes, in order");
        assert_eq!(s.replica_set(t), settled, "{t}: three members while it enters");
        assert_eq!(s.primary_of(t), Some(old[0]), "{t}: the entering node does not lead");
    }
    assert_eq!(s.under_replicated(), tenants.len(), "every third copy is still entering");
    apply(&mut s, Command::MarkDown { id: 1 }).expect("down");
    assert_eq!(s.under_replicated(), tenants.len(), "each counted once, also with a node down");
    apply(&mut s, Command::MarkUp { id: 1 }).expect("up");
    let pending = Rejection::HandoffsPending(tenants.len());
    check(
        &mut s,
        vec![
            (Command::ChangeReplicas { replicas: 4 }, Err(pending.clone())),
            (Command::ChangeReplicas { replicas: 2 }, Err(pending)),
        ],
    );
    for (t, old) in tenants.iter().zip(&before) {
        let epoch = s.placement_epoch();
        let done = Command::HandoffDone { tenant: t.clone(), epoch: epoch_of(&s, t) };
        apply(&mut s, done).expect("done");
        assert_eq!(s.placement_epoch(), epoch, "{t}: the primary did not move");
        assert_eq!(s.replica_set(t).len(), 3);
        assert_eq!(s.primary_of(t), Some(old[0]));
    }
    assert_eq!(s.under_replicated(), 0);
    // Lowered by one, every set loses its last node, under a new epoch.
    let (sets, epoch) =
        (tenants.iter().map(|t| s.replica_set(t)).collect::<Vec<_>>(), s.placement_epoch());
    check(&mut s, vec![(Command::ChangeReplicas { replicas: 2 }, Ok(()))]);
    assert_eq!((s.placement_epoch(), s.handoffs().count()), (epoch + 1, 0));
    for (t, set) in tenants.iter().zip(&sets) {
        assert_eq!(s.replica_set(t), set[..2].to_vec(), "{t}");
    }

    // Two active nodes and R = 2: a raise to 3 has no node to add.
    let (mut s, _) = cluster_with_tenants(2, 2, 1);
    let epoch = s.placement_epoch();
    check(&mut s, vec![(Command::ChangeReplicas { replicas: 3 }, Ok(()))]);
    assert_eq!((s.placement_epoch(), s.handoffs().count()), (epoch, 0));
    assert_eq!(s.under_replicated(), 1, "two copies of three");
}

/// A registry with nodes 1..=`nodes` active, R = `replicas`, and `tenants` tenants `t0`, `t1`, ...
fn cluster_with_tenants(nodes: u64, replicas: u8, tenants: usize) -> (RegistryState, Vec<String>) {
    let mut s = RegistryState::default();
    for id in 1..=nodes {
        apply(&mut s, join(id)).expect("joins");
        apply(&mut s, Command::NodeActivate { id }).expect("activates");
    }
    apply(&mut s, Command::ChangeReplicas { replicas }).expect("sets R");
    let tenants: Vec<String> = (0..tenants).map(|i| format!("t{i}")).collect();
    for t in &tenants {
        apply(&mut s, new_tenant(t, &format!("k-{t}"))).expect("adds");
    }
    (s, tenants)
}

/// The epoch of `tenant`'s pending change of its set.
fn epoch_of(s: &RegistryState, tenant: &str) -> u64 {
    s.replica_change(tenant).expect("a pending change").epoch
}

#[test]
fn a_lost_store_moves_the_epoch_past_the_one_it_was_found_at_once() {
    // Goal: the first report of a lost store moves the epoch past the epoch it names; a retry
    // of the same report, or one naming an epoch already passed, moves nothing; only a member
    // may report.
    let mut s = two_active_nodes();
    let at = s.placement_epoch();
    check(&mut s, vec![(Command::StoreLost { id: 2, epoch: at }, Ok(()))]);
    assert_eq!(s.placement_epoch(), at + 1);
    check(&mut s, vec![(Command::StoreLost { id: 2, epoch: at }, Ok(()))]);
    assert_eq!(s.placement_epoch(), at + 1, "a retry moves nothing more");
    check(&mut s, vec![(join(3), Ok(()))]);
    check(
        &mut s,
        vec![
            (Command::StoreLost { id: 3, epoch: at + 1 }, Err(Rejection::NotAMember(3))),
            (Command::StoreLost { id: 9, epoch: at + 1 }, Err(Rejection::NoSuchNode(9))),
        ],
    );
    assert_eq!(s.placement_epoch(), at + 1);
}
