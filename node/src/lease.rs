//! Node leases, and how a node is marked down (docs/REPLICATION.md, "Node leases").
//!
//! While the cluster replicates (R > 1), a primary answers a read only while it holds a lease:
//! no other node can be primary of its tenants until the lease has ended. A lease is granted by
//! a majority of the registry's voters, not by the Raft leader, so a registry election does not
//! stop reads:
//!
//! - every [`LEASE_RENEW`] a node asks every voter; a voter records, on its own monotonic clock,
//!   when it heard the node last, and grants unless it refuses the node (below);
//! - the lease runs until the send time of a round a majority granted, plus [`LEASE_MS`], on the
//!   node's own clock;
//! - to mark a node down, the registry leader asks every voter to confirm it: a voter confirms
//!   only when it has not heard the node for [`DOWN_AFTER_MS`] (a voter just started counts from
//!   its start), and from then on refuses the node's lease requests until the registry marks the
//!   node up again. With a majority of confirmations the leader commits `MarkDown`.
//!
//! A grant by one majority and a confirmation by another share a voter. That voter either
//! confirmed before it granted, and then refused, or confirmed at least [`DOWN_AFTER_MS`] after
//! the request it granted arrived, which was after the request was sent; the lease ended
//! [`LEASE_MS`] after that send. With `LEASE_MS` < `DOWN_AFTER_MS` and room for the two clocks to
//! run at different rates (up to 20%), every lease of a node has ended before it is marked down.
//!
//! A voter also grants nothing for [`DOWN_AFTER_MS`] after it starts, and refuses a node its
//! registry records as down. What it confirmed is held in memory only: a voter that restarts
//! between confirming and applying the `MarkDown` forgets its refusal (docs/REPLICATION.md says
//! what is left to build).
//!
//! Nothing here runs per tenant: a lease round is one message per node and voter.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use proto::cluster::{NodeRequest, NodeResponse};
use raft_registry::{Command, RegistryState};
use tokio_util::sync::CancellationToken;

use crate::service::Service;
use crate::store::Clock;

/// How often a node renews its lease with the voters: three renewals per lease.
pub const LEASE_RENEW: Duration = Duration::from_millis(200);

/// How long a lease runs from the send time of the round that won it.
pub const LEASE_MS: u64 = 600;

/// How long a voter must not have heard a node before it confirms it down. With the registry's
/// round and the gateway's view change after it, a frozen node's tenants move to a new primary
/// in about 1.5 s; a node whose renewals all stall for this long (a pause, a loaded machine) is
/// marked down and up again, which costs its tenants a prepare round each.
pub const DOWN_AFTER_MS: u64 = 1_000;

/// How long a read that finds its node without a lease waits for the next round to win one
/// before it is answered 503 ([`Leases::held_within`]): a round lost to a busy moment, or a node
/// just started whose voters grant nothing for [`DOWN_AFTER_MS`], costs the client a short wait
/// rather than a retry. A node cut off from the voters for longer is marked down meanwhile.
pub const LEASE_WAIT: Duration = Duration::from_millis(DOWN_AFTER_MS);

/// How often a waiting read looks at the lease again.
const LEASE_WAIT_LOOK: Duration = Duration::from_millis(20);

/// A node still heard by a voter, but without a lease for this long, is refused and then
/// confirmed down by it ([`Leases::confirm_down`]): twice the down time, so that a whole cluster
/// starting together (its voters grant nothing for the down time) is not marked down.
const STUCK_WITHOUT_LEASE_MS: u64 = 2 * DOWN_AFTER_MS;

/// A node marked down is marked up once the leader heard its lease request this recently.
const UP_HEARD_WITHIN_MS: u64 = 500;

/// How long one lease or confirmation request may take.
const LEASE_CALL_TIMEOUT: Duration = Duration::from_millis(500);

/// This node's lease, and, as a voter, what it heard from every node and whom it refuses.
pub struct Leases {
    clock: Arc<dyn Clock>,
    /// When this node started, or last resumed from a pause ([`Leases::tick`]): it counts
    /// silences from then, and grants nothing for [`DOWN_AFTER_MS`] after.
    started_ms: AtomicU64,
    /// The last renewal round's time, to tell a pause of this process.
    last_tick_ms: AtomicU64,
    /// Whether this node last saw the cluster replicate (R > 1), and since when on its clock
    /// ([`Leases::replicating`]).
    replicating: AtomicBool,
    replicating_since_ms: AtomicU64,
    /// When each node's lease request last arrived, on this node's clock.
    heard: Mutex<HashMap<u64, u64>>,
    /// When this voter last granted each node's lease request, on its clock.
    granted: Mutex<HashMap<u64, u64>>,
    /// Nodes this voter confirmed down, with the placement epoch it had applied then.
    refusing: Mutex<HashMap<u64, u64>>,
    /// How long each node said, in its last lease request, it had been without a lease, with
    /// the epoch of its latest mark down or up it knew then ([`Lapse`]).
    lapses: Mutex<HashMap<u64, Lapse>>,
    /// The epoch of this node's latest mark down or up it has seen, and when it saw it: it
    /// counts its time without a lease from then ([`Leases::lapsed_for`]).
    mark_seen: Mutex<(u64, u64)>,
    /// This node's lease runs until this time on its clock (0: no lease yet).
    until_ms: AtomicU64,
    /// The highest placement epoch a voter had applied when it granted the lease: the node holds
    /// it only once its own registry has reached that epoch. A node marked down and up again
    /// while it was away thus serves nothing until it has learnt so, and prepared anew.
    epoch: AtomicU64,
}

/// What a node said in its last lease request about its time without a lease.
#[derive(Clone, Copy)]
struct Lapse {
    ms: u64,
    /// The epoch of the node's latest mark down or up it had applied (0: none).
    mark_epoch: u64,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().expect("lease lock poisoned: a thread panicked while holding it")
}

impl Leases {
    pub fn new(clock: Arc<dyn Clock>) -> Leases {
        let started_ms = clock.now_ms();
        Leases {
            clock,
            started_ms: AtomicU64::new(started_ms),
            last_tick_ms: AtomicU64::new(started_ms),
            replicating: AtomicBool::new(false),
            replicating_since_ms: AtomicU64::new(0),
            heard: Mutex::new(HashMap::new()),
            granted: Mutex::new(HashMap::new()),
            refusing: Mutex::new(HashMap::new()),
            lapses: Mutex::new(HashMap::new()),
            mark_seen: Mutex::new((0, started_ms)),
            until_ms: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
        }
    }

    /// Whether the cluster replicates in `state` (R > 1): leases and marks run only then. When it
    /// starts to (R raised from 1, or this node's first look), no node has asked for a lease
    /// yet, so every silence and lapse counts from now, as from a voter's start. Without this,
    /// a raise from 1 had the registry leader mark every node down at once: each had been
    /// "without a lease" since it started. Voters still grant at once: unlike a restarted one,
    /// such a voter forgot none of its refusals.
    pub fn replicating(&self, state: &RegistryState) -> bool {
        let now = state.replicas() > 1;
        if now && !self.replicating.load(Ordering::SeqCst) {
            // The time first: whoever sees the flag counts from it. Lapses told before R last
            // went to 1 say nothing about now.
            self.replicating_since_ms.store(self.clock.now_ms(), Ordering::SeqCst);
            locked(&self.lapses).clear();
            self.replicating.store(true, Ordering::SeqCst);
        } else if !now {
            self.replicating.store(false, Ordering::SeqCst);
        }
        now
    }

    /// When this node counts silences and lapses from: its start or resumption from a pause,
    /// or when the cluster started to replicate, whichever is later.
    fn counted_from(&self) -> u64 {
        self.started_ms.load(Ordering::SeqCst).max(self.replicating_since_ms.load(Ordering::SeqCst))
    }

    /// Whether this node, its registry at placement epoch `epoch`, holds a lease now.
    pub fn holds(&self, epoch: u64) -> bool {
        self.clock.now_ms() < self.until_ms.load(Ordering::SeqCst)
            && epoch >= self.epoch.load(Ordering::SeqCst)
    }

    /// Whether this node holds a lease at `epoch` now or within [`LEASE_WAIT`].
    pub async fn held_within(&self, epoch: u64) -> bool {
        let looks = LEASE_WAIT.as_millis() / LEASE_WAIT_LOOK.as_millis();
        for _ in 0..looks {
            if self.holds(epoch) {
                return true;
            }
            tokio::time::sleep(LEASE_WAIT_LOOK).await;
        }
        self.holds(epoch)
    }

    /// Notes the epoch of this node's latest mark down or up in its registry, `mark_epoch`: a
    /// new mark restarts its count of time without a lease. A node just marked up after a
    /// long lapse is otherwise taken as stuck again before its first lease round could win.
    pub fn see_mark(&self, mark_epoch: u64) {
        let mut seen = locked(&self.mark_seen);
        if mark_epoch > seen.0 {
            *seen = (mark_epoch, self.clock.now_ms());
        }
    }

    /// The epoch of this node's latest mark down or up it has seen (0: none).
    pub fn mark_seen(&self) -> u64 {
        locked(&self.mark_seen).0
    }

    /// How long this node has been without a lease, counting from its start (if it never held
    /// one) or its latest mark down or up, at the latest.
    pub fn lapsed_for(&self) -> u64 {
        let since = self
            .until_ms
            .load(Ordering::SeqCst)
            .max(self.counted_from())
            .max(locked(&self.mark_seen).1);
        self.clock.now_ms().saturating_sub(since)
    }

    /// As a voter: `from` says it has been without a lease for `lapsed_ms`, and that the latest
    /// mark of it it knows has epoch `mark_epoch`.
    pub fn note_lapse(&self, from: u64, lapsed_ms: u64, mark_epoch: u64) {
        locked(&self.lapses).insert(from, Lapse { ms: lapsed_ms, mark_epoch });
    }

    /// How long `node` last said it had been without a lease, if it said so knowing every mark
    /// of it in `state`: a lapse told before the node learnt of a later mark (a mark up, which
    /// restarts its count) says nothing about it now.
    fn lapse(&self, node: u64, state: &RegistryState) -> Option<u64> {
        let known = state.liveness(node).map_or(0, |l| l.epoch);
        let lapse = locked(&self.lapses).get(&node).copied()?;
        (lapse.mark_epoch >= known).then_some(lapse.ms)
    }

    /// Whether `node` last said it had been without a lease for the down time: some voters may
    /// refuse it for good (they confirmed it down for a leader whose mark was never committed).
    fn lapsed_long(&self, node: u64, state: &RegistryState) -> bool {
        self.lapse(node, state).is_some_and(|ms| ms >= DOWN_AFTER_MS)
    }

    /// A majority granted the round sent at `sent_ms`, the highest epoch among them `epoch`.
    fn won(&self, sent_ms: u64, epoch: u64) {
        self.epoch.fetch_max(epoch, Ordering::SeqCst);
        self.until_ms.fetch_max(sent_ms + LEASE_MS, Ordering::SeqCst);
    }

    /// Called each renewal round. A round later than [`DOWN_AFTER_MS`] after the one before
    /// means this process was paused (frozen, descheduled): it heard nothing meanwhile, through
    /// no fault of the others, so it starts over as a voter just started does.
    pub fn tick(&self) {
        let now = self.clock.now_ms();
        let last = self.last_tick_ms.swap(now, Ordering::SeqCst);
        if now.saturating_sub(last) > DOWN_AFTER_MS {
            self.started_ms.store(now, Ordering::SeqCst);
        }
    }

    /// How long ago `node`'s lease request last arrived here, counting from this node's start
    /// (or its resumption from a pause) at the latest.
    pub fn heard_age(&self, node: u64) -> u64 {
        let from = self.counted_from();
        let last = locked(&self.heard).get(&node).copied().unwrap_or(from).max(from);
        self.clock.now_ms().saturating_sub(last)
    }

    /// As a voter: `from` asks for its lease. Records that it was heard; grants unless this voter
    /// started less than [`DOWN_AFTER_MS`] ago, `state` records `from` as down, or this voter
    /// confirmed `from` down and the registry has not marked it up since.
    pub fn grant(&self, from: u64, state: &RegistryState) -> bool {
        self.replicating(state);
        let now = self.clock.now_ms();
        locked(&self.heard).insert(from, now);
        if now < self.started_ms.load(Ordering::SeqCst) + DOWN_AFTER_MS || state.is_down(from) {
            return false;
        }
        let mut refusing = locked(&self.refusing);
        if let Some(&confirmed_at) = refusing.get(&from) {
            let up_since = state.liveness(from).is_some_and(|l| !l.down && l.epoch > confirmed_at);
            if !up_since {
                return false;
            }
            refusing.remove(&from);
        }
        locked(&self.granted).insert(from, now);
        true
    }

    /// How long ago this voter last granted `node` a lease (since it started, at the latest).
    fn granted_age(&self, node: u64) -> u64 {
        let from = self.counted_from();
        let last = locked(&self.granted).get(&node).copied().unwrap_or(from).max(from);
        self.clock.now_ms().saturating_sub(last)
    }

    /// As a voter: the registry leader asks whether `node` is down. Confirms, and refuses its
    /// leases from now on, when it has not been heard for [`DOWN_AFTER_MS`], or when it refuses
    /// the node already and granted it nothing for as long.
    ///
    /// A node still heard that says it has been without a lease for
    /// [`STUCK_WITHOUT_LEASE_MS`] (refused by voters that confirmed it for a mark never
    /// committed: with an even number of voters, the refusing half can neither grant it a lease
    /// nor mark it down with the other half) is refused from now on, and confirmed once this
    /// voter's last grant to it is [`DOWN_AFTER_MS`] old: every lease a round this voter granted
    /// could make has ended by then, as with a node not heard.
    pub fn confirm_down(&self, node: u64, state: &RegistryState) -> bool {
        self.replicating(state);
        let mut refusing = locked(&self.refusing);
        if refusing.contains_key(&node) {
            return self.granted_age(node) >= DOWN_AFTER_MS;
        }
        if self.heard_age(node) >= DOWN_AFTER_MS {
            refusing.insert(node, state.placement_epoch());
            return true;
        }
        if self.lapse(node, state).is_some_and(|ms| ms >= STUCK_WITHOUT_LEASE_MS) {
            refusing.insert(node, state.placement_epoch());
            return self.granted_age(node) >= DOWN_AFTER_MS;
        }
        false
    }

    fn refuses(&self, node: u64) -> bool {
        locked(&self.refusing).contains_key(&node)
    }
}

/// Renews this node's lease, and on the registry leader marks nodes down and up, every
/// [`LEASE_RENEW`] while the cluster replicates, until `shutdown`.
pub async fn run(svc: Arc<Service>, shutdown: CancellationToken) {
    let watcher = tokio::spawn(watch_loop(svc.clone(), shutdown.clone()));
    loop {
        svc.leases.tick();
        let state = svc.registry.state();
        if svc.leases.replicating(&state) {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = renew(&svc, &state) => {}
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(LEASE_RENEW) => {}
        }
    }
    let _ = watcher.await;
}

/// One lease round: asks every voter, and holds the lease from the round's send time once a
/// majority granted it.
async fn renew(svc: &Service, state: &RegistryState) {
    let voters = svc.registry.status().voters;
    let sent_ms = svc.clock.now_ms();
    svc.leases.see_mark(state.liveness(svc.id).map_or(0, |l| l.epoch));
    let mark_epoch = svc.leases.mark_seen();
    let mut asks: FuturesUnordered<_> = voters
        .iter()
        .map(|&voter| async move {
            let lapsed_ms = svc.leases.lapsed_for();
            if voter == svc.id {
                svc.leases.note_lapse(svc.id, lapsed_ms, mark_epoch);
                return svc.leases.grant(svc.id, state).then_some(state.placement_epoch());
            }
            match call(
                svc,
                state,
                voter,
                NodeRequest::Lease { from: svc.id, lapsed_ms, mark_epoch },
            )
            .await
            {
                Some(NodeResponse::Lease { granted: true, epoch }) => Some(epoch),
                _ => None,
            }
        })
        .collect();
    let (mut granted, mut epoch) = (0, 0);
    while let Some(answer) = asks.next().await {
        if let Some(at) = answer {
            granted += 1;
            epoch = epoch.max(at);
        }
        if granted * 2 > voters.len() {
            svc.leases.won(sent_ms, epoch);
            return;
        }
    }
}

/// On the registry leader: marks down an active node no voter majority has heard for the down
/// time, and marks up a down node that renews again.
async fn watch_loop(svc: Arc<Service>, shutdown: CancellationToken) {
    loop {
        let state = svc.registry.state();
        if svc.leases.replicating(&state) && svc.registry.status().is_leader {
            let nodes = async {
                // Itself too: voters may refuse the leader's own lease for good.
                for node in state.active_nodes() {
                    watch(&svc, &state, node).await;
                }
            };
            // A stopping node does not wait for a mark it was committing (the others may be
            // stopping too, and the registry have no majority).
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = nodes => {}
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(LEASE_RENEW) => {}
        }
    }
}

async fn watch(svc: &Service, state: &RegistryState, node: u64) {
    let leases = &svc.leases;
    if state.is_down(node) {
        if leases.heard_age(node) < UP_HEARD_WITHIN_MS {
            mark(svc, Command::MarkUp { id: node }).await;
        }
        return;
    }
    // A node that renews may still be refused by a majority of voters, each of which
    // confirmed it down to a leader whose mark was never committed; it says how long it has
    // been without a lease, and a confirmation round then marks it down (and it is marked up
    // again once heard), which ends those refusals.
    if leases.heard_age(node) < DOWN_AFTER_MS
        && !leases.refuses(node)
        && !leases.lapsed_long(node, state)
    {
        return;
    }
    let voters = svc.registry.status().voters;
    let asks = voters.iter().filter(|&&voter| voter != svc.id).map(|&voter| async move {
        let answer = call(svc, state, voter, NodeRequest::ConfirmDown { node }).await;
        matches!(answer, Some(NodeResponse::ConfirmDown { confirmed: true }))
    });
    let mut confirmed = futures::future::join_all(asks).await.into_iter().filter(|&c| c).count();
    // This node's own confirmation comes last, and only if it completes a majority: a voter
    // that confirms refuses the node's leases until it is marked down and up again, and a
    // leader that confirmed in a round the others did not would refuse a node they all still
    // hear, and ask about it every round, for good.
    if voters.contains(&svc.id)
        && (confirmed + 1) * 2 > voters.len()
        && svc.leases.confirm_down(node, state)
    {
        confirmed += 1;
    }
    if confirmed * 2 > voters.len() {
        mark(svc, Command::MarkDown { id: node }).await;
    }
}

async fn mark(svc: &Service, command: Command) {
    let what = format!("{command:?}");
    match crate::admin::commit(svc, command).await {
        Ok(()) => tracing::warn!(change = %what, "node liveness changed"),
        Err(e) => tracing::info!(change = %what, error = %e, "node liveness change not committed"),
    }
}

async fn call(
    svc: &Service,
    state: &RegistryState,
    node: u64,
    request: NodeRequest,
) -> Option<NodeResponse> {
    let addr = state.node(node)?.addr.parse().ok()?;
    let bytes = proto::wire::encode(&request).ok()?;
    let answer = svc.peers.call(addr, bytes.into(), LEASE_CALL_TIMEOUT).await.ok()?;
    proto::wire::decode(&answer).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ManualClock;
    use raft_registry::command::apply;

    fn cluster() -> RegistryState {
        let mut s = RegistryState::default();
        for id in 1..=3 {
            apply(&mut s, Command::NodeJoin { id, addr: format!("n{id}:1") }).expect("joins");
            apply(&mut s, Command::NodeActivate { id }).expect("activates");
        }
        s
    }

    #[test]
    fn a_voter_grants_and_confirms_by_the_rules() {
        // Goal: a voter grants nothing while it is just started; grants a node it hears; will
        // not confirm a node heard within the down time, confirms one silent for it and refuses
        // it from then on, also after a `MarkDown`, until a `MarkUp` after the confirmation.
        let clock = Arc::new(ManualClock::new(10_000));
        let leases = Leases::new(clock.clone());
        let mut s = cluster();
        assert!(!leases.grant(2, &s), "nothing granted just after start");
        clock.advance_ms(DOWN_AFTER_MS);
        assert!(leases.grant(2, &s));
        assert!(!leases.confirm_down(2, &s), "heard just now");
        assert!(leases.confirm_down(3, &s), "never heard since the start, the down time ago");
        clock.advance_ms(DOWN_AFTER_MS - 1);
        assert!(!leases.confirm_down(2, &s));
        clock.advance_ms(1);
        assert!(leases.confirm_down(2, &s));
        assert!(!leases.grant(2, &s), "refused once confirmed");
        assert!(leases.heard_age(2) == 0, "a refused request is still heard");
        assert!(leases.confirm_down(2, &s), "confirmed again, though heard");
        apply(&mut s, Command::MarkDown { id: 2 }).expect("down");
        assert!(!leases.grant(2, &s));
        apply(&mut s, Command::MarkUp { id: 2 }).expect("up");
        assert!(leases.grant(2, &s), "granted after a mark up");
        assert!(!leases.confirm_down(2, &s), "and heard again");
        // Marked down by a leader this voter did not confirm for: refused all the same.
        apply(&mut s, Command::MarkDown { id: 1 }).expect("down");
        assert!(!leases.grant(1, &s));
    }

    #[test]
    fn a_voter_refuses_a_heard_node_long_without_a_lease_and_confirms_it_once_its_grant_is_old() {
        // Goal: a node still heard that says it has been without a lease for twice the down
        // time (refused by the other half of an even number of voters) is refused from the
        // leader's first question on, and confirmed only once this voter's last grant to it is
        // the down time old; a node that says it lost its lease only briefly is neither.
        let clock = Arc::new(ManualClock::new(10_000));
        let leases = Leases::new(clock.clone());
        let s = cluster();
        clock.advance_ms(DOWN_AFTER_MS);
        assert!(leases.grant(2, &s) && leases.grant(3, &s));
        leases.note_lapse(3, 10, 0);
        assert!(!leases.confirm_down(3, &s), "heard, and without a lease only briefly");
        assert!(leases.grant(3, &s), "and still granted");
        leases.note_lapse(2, STUCK_WITHOUT_LEASE_MS - 1, 0);
        assert!(!leases.confirm_down(2, &s), "a lapse a whole cluster's start can make");
        assert!(leases.grant(2, &s));
        leases.note_lapse(2, STUCK_WITHOUT_LEASE_MS, 0);
        assert!(!leases.confirm_down(2, &s), "granted just now: its lease may run");
        assert!(!leases.grant(2, &s), "refused from the question on");
        clock.advance_ms(DOWN_AFTER_MS - 1);
        assert!(!leases.grant(2, &s));
        assert!(!leases.confirm_down(2, &s), "its last grant is not the down time old yet");
        clock.advance_ms(1);
        assert!(leases.confirm_down(2, &s), "every lease this voter helped make has ended");
    }

    #[test]
    fn a_lapse_told_before_the_node_learnt_of_its_mark_up_is_not_taken() {
        // Goal: once a node is marked up, a voter does not take a long lapse it told before it
        // learnt of that mark (it restarts its count then), so the node is not refused and
        // marked down again before its first round since could win a lease; a lapse told
        // knowing the mark is taken. With two voters, one stale lapse each way kept both nodes
        // marked down and up for good.
        let clock = Arc::new(ManualClock::new(10_000));
        let leases = Leases::new(clock.clone());
        let mut s = cluster();
        clock.advance_ms(DOWN_AFTER_MS);
        apply(&mut s, Command::MarkDown { id: 2 }).expect("down");
        apply(&mut s, Command::MarkUp { id: 2 }).expect("up");
        let up = s.liveness(2).expect("marked").epoch;
        assert!(leases.grant(2, &s));
        leases.note_lapse(2, STUCK_WITHOUT_LEASE_MS, up - 1);
        assert!(!leases.lapsed_long(2, &s), "told before the mark up");
        assert!(!leases.confirm_down(2, &s));
        assert!(leases.grant(2, &s), "not refused");
        leases.note_lapse(2, STUCK_WITHOUT_LEASE_MS, up);
        assert!(leases.lapsed_long(2, &s), "told knowing the mark up");
        assert!(!leases.confirm_down(2, &s), "granted just now");
        assert!(!leases.grant(2, &s), "refused from the question on");
    }

    #[test]
    fn a_node_counts_its_time_without_a_lease_from_its_latest_mark() {
        // Goal: a node without a lease since its start counts from there, and from the moment
        // it sees a newer mark of itself; an older or the same mark changes nothing.
        let clock = Arc::new(ManualClock::new(10_000));
        let leases = Leases::new(clock.clone());
        clock.advance_ms(3_000);
        assert_eq!(leases.lapsed_for(), 3_000);
        leases.see_mark(7);
        assert_eq!((leases.lapsed_for(), leases.mark_seen()), (0, 7));
        clock.advance_ms(500);
        leases.see_mark(7);
        leases.see_mark(6);
        assert_eq!((leases.lapsed_for(), leases.mark_seen()), (500, 7));
    }

    #[test]
    fn a_voter_back_from_a_pause_starts_over() {
        // Goal: a voter whose rounds stopped for longer than the down time (it was frozen)
        // counts silences from its resumption, so it confirms no one down at once, and grants
        // nothing for the down time, as a voter just started.
        let clock = Arc::new(ManualClock::new(10_000));
        let leases = Leases::new(clock.clone());
        let s = cluster();
        clock.advance_ms(DOWN_AFTER_MS);
        leases.tick();
        assert!(leases.grant(2, &s));
        clock.advance_ms(5 * DOWN_AFTER_MS);
        leases.tick();
        assert!(!leases.confirm_down(2, &s), "silent only while this voter was paused");
        assert!(!leases.grant(2, &s), "nothing granted just after a pause");
        clock.advance_ms(DOWN_AFTER_MS);
        leases.tick();
        assert!(leases.grant(2, &s));
    }

    #[test]
    fn a_raise_from_one_copy_counts_silences_and_lapses_from_the_raise() {
        // Goal: with R = 1 no node asks for a lease. When R is raised, a node that ran for long
        // without one is neither silent nor stuck: a voter confirms no one down at once, and a
        // node's own time without a lease counts from the raise; a node silent for the down
        // time after the raise is confirmed as usual.
        let clock = Arc::new(ManualClock::new(10_000));
        let leases = Leases::new(clock.clone());
        let mut s = cluster();
        assert!(!leases.replicating(&s), "R = 1");
        for _ in 0..300 {
            clock.advance_ms(LEASE_RENEW.as_millis() as u64);
            leases.tick();
        }
        assert!(leases.lapsed_for() >= 60 * DOWN_AFTER_MS, "no lease since the start");
        apply(&mut s, Command::ChangeReplicas { replicas: 2 }).expect("raised");
        assert!(leases.grant(2, &s), "granted at once");
        assert_eq!(leases.lapsed_for(), 0, "counted from the raise");
        assert!(!leases.confirm_down(1, &s), "not heard, but only since the raise");
        clock.advance_ms(DOWN_AFTER_MS - 1);
        leases.tick();
        assert!(leases.grant(2, &s));
        clock.advance_ms(1);
        assert!(leases.confirm_down(1, &s), "silent for the down time since the raise");
        assert!(!leases.confirm_down(2, &s), "still heard within it");
        // A long lapse told while R > 1 is forgotten when R goes to 1 and is raised again.
        leases.note_lapse(3, 5 * DOWN_AFTER_MS, 0);
        assert!(leases.lapsed_long(3, &s));
        apply(&mut s, Command::ChangeReplicas { replicas: 1 }).expect("lowered");
        assert!(!leases.replicating(&s));
        apply(&mut s, Command::ChangeReplicas { replicas: 2 }).expect("raised again");
        assert!(leases.replicating(&s));
        assert!(!leases.lapsed_long(3, &s), "told before the raise");
    }

    #[test]
    fn a_lease_runs_from_the_send_time_of_the_round_that_won_it() {
        // Goal: a lease won by a round sent at t holds until t + LEASE_MS, not from when the
        // answers came, and only for a registry at the highest epoch a granting voter had; an
        // older round never shortens it or lowers that epoch.
        let clock = Arc::new(ManualClock::new(50_000));
        let leases = Leases::new(clock.clone());
        assert!(!leases.holds(0));
        let sent = clock.now_ms();
        clock.advance_ms(300);
        leases.won(sent, 7);
        assert!(leases.holds(7));
        assert!(!leases.holds(6), "not held by a node whose registry is behind the voters'");
        leases.won(sent - 200, 5);
        clock.advance_ms(LEASE_MS - 301);
        assert!(leases.holds(7));
        clock.advance_ms(1);
        assert!(!leases.holds(7), "ended LEASE_MS after the send");
    }

    #[tokio::test]
    async fn a_read_waits_for_a_lease_being_won_and_no_longer_than_the_wait() {
        // Goal: a read finding no lease is answered once a round wins one within LEASE_WAIT, and
        // refused when none does (never held on past the wait).
        let clock = Arc::new(ManualClock::new(50_000));
        let leases = Arc::new(Leases::new(clock.clone()));
        let started = std::time::Instant::now();
        assert!(!leases.held_within(3).await, "no round won: refused");
        assert!(started.elapsed() < LEASE_WAIT * 3, "refused after the wait, not held on");
        let winner = leases.clone();
        let round = tokio::spawn(async move {
            tokio::time::sleep(LEASE_WAIT / 4).await;
            winner.won(clock.now_ms(), 3);
        });
        assert!(leases.held_within(3).await, "a round won during the wait: answered");
        round.await.expect("the round");
        assert!(!leases.held_within(2).await, "not by a node whose registry is behind the voters'");
    }
}
