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
//!   node up again. With a majority of confirmations the leader commits `MarkDownAfter`, which
//!   the registry applies only if the node was not marked since the leader looked at it.
//!
//! A grant by one majority and a confirmation by another share a voter. That voter either
//! confirmed before it granted, and then refused, or confirmed at least [`DOWN_AFTER_MS`] after
//! the request it granted arrived, which was after the request was sent; the lease ended
//! [`LEASE_MS`] after that send. With `LEASE_MS` < `DOWN_AFTER_MS` and room for the two clocks to
//! run at different rates (up to 20%), every lease of a node has ended before it is marked down.
//!
//! A voter also grants nothing for [`DOWN_AFTER_MS`] after it starts, and refuses a node its
//! registry records as down. What it confirmed is held in memory only: a voter that restarts
//! between confirming and applying the `MarkDownAfter` forgets its refusal (docs/REPLICATION.md says
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

/// How often a node that does not lead the registry looks whether it does now, to watch the
/// nodes from then on ([`watch_loop`]).
const LEADER_LOOK: Duration = Duration::from_millis(50);

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
        let known = state.mark_epoch(node);
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
        if refusal_stands(&mut locked(&self.refusing), from, state) {
            return false;
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
        if refusal_stands(&mut refusing, node, state) {
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

    fn refuses(&self, node: u64, state: &RegistryState) -> bool {
        refusal_stands(&mut locked(&self.refusing), node, state)
    }
}

/// Whether this voter still refuses `node`: it confirmed it down, and `state` has not marked it
/// up since. A refusal the registry has answered with a mark down and then up is dropped; left
/// standing, the leader took a node it had just marked up, before its first lease request
/// since, as one to confirm down again.
fn refusal_stands(refusing: &mut HashMap<u64, u64>, node: u64, state: &RegistryState) -> bool {
    let Some(&confirmed_at) = refusing.get(&node) else {
        return false;
    };
    let up_since = state.liveness(node).is_some_and(|l| !l.down && l.epoch > confirmed_at);
    if up_since {
        refusing.remove(&node);
    }
    !up_since
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
    svc.leases.see_mark(state.mark_epoch(svc.id));
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
        // A leader resumed from a pause may run this before its renewal round does: the silence
        // it would otherwise find is its own, not the nodes'.
        svc.leases.tick();
        let state = svc.registry.state();
        let leads = svc.registry.status().is_leader;
        if svc.leases.replicating(&state) && leads {
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
        // A node just elected, after its leader froze, finds that node unheard for the down time
        // already: it looks often while it does not lead, to start its rounds at once.
        let next = if leads { LEASE_RENEW } else { LEADER_LOOK };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(next) => {}
        }
    }
}

async fn watch(svc: &Service, state: &RegistryState, node: u64) {
    let leases = &svc.leases;
    // A mark is decided on this view of the node, and is void once the node is marked again.
    let last_mark = state.mark_epoch(node);
    if state.is_down(node) {
        if leases.heard_age(node) < UP_HEARD_WITHIN_MS {
            mark(svc, Command::MarkUpAfter { id: node, last_mark }).await;
        }
        return;
    }
    // A node that renews may still be refused by a majority of voters, each of which
    // confirmed it down to a leader whose mark was never committed; it says how long it has
    // been without a lease, and a confirmation round then marks it down (and it is marked up
    // again once heard), which ends those refusals.
    if leases.heard_age(node) < DOWN_AFTER_MS
        && !leases.refuses(node, state)
        && !leases.lapsed_long(node, state)
    {
        return;
    }
    let voters = svc.registry.status().voters;
    let mut asks: FuturesUnordered<_> = voters
        .iter()
        .filter(|&&voter| voter != svc.id)
        .map(|&voter| async move {
            let answer = call(svc, state, voter, NodeRequest::ConfirmDown { node }).await;
            matches!(answer, Some(NodeResponse::ConfirmDown { confirmed: true }))
        })
        .collect();
    // The round ends at a majority, not at the last answer: the node in question is a voter
    // too, and one that is frozen or dead answers only when its call times out.
    let (mut confirmed, mut own_asked) = (0, false);
    while confirmed * 2 <= voters.len() {
        // This node's own confirmation comes last, and only if it completes a majority: a voter
        // that confirms refuses the node's leases until it is marked down and up again, and a
        // leader that confirmed in a round the others did not would refuse a node they all
        // still hear, and ask about it every round, for good.
        if !own_asked && voters.contains(&svc.id) && (confirmed + 1) * 2 > voters.len() {
            own_asked = true;
            if svc.leases.confirm_down(node, state) {
                confirmed += 1;
                continue;
            }
        }
        match asks.next().await {
            Some(true) => confirmed += 1,
            Some(false) => {}
            None => return,
        }
    }
    mark(svc, Command::MarkDownAfter { id: node, last_mark }).await;
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
mod tests;
