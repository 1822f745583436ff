//! Health gossip: heartbeat counters spread between nodes over QUIC.
//!
//! Each node bumps its own counter every [`GossipConfig::interval_ms`] and sends its table of
//! counters to every peer, which keeps the larger of each. A node whose counter has not grown for
//! `suspect_after_ms` is suspect; for `dead_after_ms`, dead. The gateway reads these states in its
//! registry view and answers 503 at once for a dead node's tenants.
//!
//! A node that gossips to a peer whose registry records it as removed is answered "removed"
//! instead of a table: that is how a node removed while it was away learns it
//! ([`Health::told_removed`]; whom it believes is `raft_registry::removal`'s rule).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::cluster::{NodeRequest, NodeResponse, NodeState};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::store::Clock;

/// Gossip timing, all in milliseconds; `[gossip]` in node.toml.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GossipConfig {
    /// How often a node bumps its heartbeat and sends its table. Default 250.
    pub interval_ms: u64,
    /// Silence after which a node is suspect. Default 1500.
    pub suspect_after_ms: u64,
    /// Silence after which a node is dead. Default 3000: a dead node is known within 5 s.
    pub dead_after_ms: u64,
}

impl Default for GossipConfig {
    fn default() -> Self {
        GossipConfig { interval_ms: 250, suspect_after_ms: 1500, dead_after_ms: 3000 }
    }
}

impl GossipConfig {
    /// Refuses timings that cannot work: a node must be able to miss a few rounds before it is
    /// suspect, and be suspect before it is dead.
    pub fn check(&self) -> Result<(), GossipConfigError> {
        if self.interval_ms == 0
            || self.suspect_after_ms < 2 * self.interval_ms
            || self.dead_after_ms <= self.suspect_after_ms
        {
            return Err(GossipConfigError(*self));
        }
        Ok(())
    }
}

/// Gossip timings that cannot work, as configured.
#[derive(Debug, thiserror::Error)]
#[error(
    "gossip: need 0 < interval_ms, 2 × interval_ms ≤ suspect_after_ms < dead_after_ms; got {} / {} / {}",
    .0.interval_ms, .0.suspect_after_ms, .0.dead_after_ms
)]
pub struct GossipConfigError(GossipConfig);

/// A peer's health as this node's gossip sees it.
pub use proto::cluster::NodeHealth as State;

/// The largest heartbeat a peer may report for this node: 2^48 beats are 35,000 years at the
/// default 250 ms interval, so only a corrupt or hostile claim reaches it.
pub const HEARTBEAT_CLAIM_MAX: u64 = 1 << 48;

struct Entry {
    heartbeat: u64,
    /// Local clock time at which `heartbeat` last grew.
    seen_ms: u64,
    state: State,
}

/// This node's table of every node's heartbeat.
pub struct Health {
    me: u64,
    config: GossipConfig,
    clock: Arc<dyn Clock>,
    table: Mutex<HashMap<u64, Entry>>,
    /// Set when a state changed, so the cached registry view is rebuilt.
    changed: AtomicBool,
    /// Grows by one at every state change; view long-polls wait on it as well as on the
    /// registry, so gateways learn of a dead (or returning) node at once.
    generation: tokio::sync::watch::Sender<u64>,
    /// The highest counter of this node's that a peer has told it of: the version of its
    /// verdict on itself.
    acknowledged: AtomicU64,
    /// Set once a peer told this node it was removed and the node believed it
    /// ([`Registry::judge_removal_claim`](raft_registry::Registry::judge_removal_claim)).
    told_removed: tokio::sync::watch::Sender<Option<RemovedBy>>,
}

/// A peer's word, believed, that this node was removed from the cluster while it was away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemovedBy {
    /// The node that said so.
    pub peer: u64,
    /// The position of its applied registry, which records the removal.
    pub applied: proto::cluster::RegistryPosition,
}

impl Health {
    pub fn new(me: u64, config: GossipConfig, clock: Arc<dyn Clock>) -> Health {
        let generation = tokio::sync::watch::Sender::new(0);
        // This node is in its table from the start, so the table's limit counts it too.
        let mine = Entry { heartbeat: 0, seen_ms: clock.now_ms(), state: State::Alive };
        Health {
            me,
            config,
            clock,
            table: Mutex::new(HashMap::from([(me, mine)])),
            changed: AtomicBool::new(false),
            generation,
            acknowledged: AtomicU64::new(0),
            told_removed: tokio::sync::watch::Sender::new(None),
        }
    }

    /// Waits until a peer told this node it was removed and the node believed it.
    pub async fn told_removed(&self) -> RemovedBy {
        let mut rx = self.told_removed.subscribe();
        loop {
            if let Some(by) = *rx.borrow_and_update() {
                return by;
            }
            if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Node `peer`, whose applied registry at `applied` records this node as removed, said so;
    /// `registry` judges whether to believe it. Refusals are logged at debug: a stale peer
    /// repeats its claim every round.
    fn removal_claim(
        &self,
        registry: &raft_registry::Registry,
        peer: u64,
        applied: proto::cluster::RegistryPosition,
    ) {
        match registry.judge_removal_claim(peer, applied) {
            Ok(()) => {
                let by = RemovedBy { peer, applied };
                self.told_removed.send_if_modified(|told| {
                    let first = told.is_none();
                    if first {
                        *told = Some(by);
                    }
                    first
                });
            }
            Err(why) => {
                tracing::debug!(peer, %applied, reason = %why, "not believed: a peer says this node was removed");
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state of node `id`. A node never heard from counts as alive until it has been silent
    /// for the dead timeout since this node started watching it.
    pub fn of(&self, id: u64) -> State {
        if id == self.me {
            return State::Alive;
        }
        self.lock().get(&id).map_or(State::Alive, |e| e.state)
    }

    /// The state of node `id` and the heartbeat counter it is based on (its version).
    ///
    /// This node's word on itself carries the highest counter its peers have told it they saw:
    /// its own counter runs ahead of theirs, so at that version its last "alive" would outrank
    /// their "dead" (given at the last beat they saw) once it is gone; at theirs it never does.
    pub fn verdict(&self, id: u64) -> (State, u64) {
        if id == self.me {
            return (State::Alive, self.acknowledged.load(Ordering::SeqCst));
        }
        let table = self.lock();
        table.get(&id).map_or((State::Alive, 0), |e| (e.state, e.heartbeat))
    }

    /// Takes the larger counter for each node; returns this side's table for the reply. A node
    /// not yet in the table is added only while it holds fewer than [`GOSSIP_NODES_MAX`]; the
    /// rest of a longer message is ignored.
    pub fn merge(&self, _from: u64, heartbeats: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let now = self.clock.now_ms();
        let mut table = self.lock();
        for &(id, beat) in heartbeats.iter().take(GOSSIP_NODES_MAX) {
            if id == self.me {
                // A restarted node counts from 0 while its peers remember its old counter; it
                // takes that counter up again, or they would hear nothing new from it (and call
                // it dead) until it had beaten as often as before. A claim at or past
                // HEARTBEAT_CLAIM_MAX is refused: near the top the counter could never grow
                // again, and this node would look dead to all.
                if beat < HEARTBEAT_CLAIM_MAX {
                    if let Some(mine) = table.get_mut(&id) {
                        mine.heartbeat = mine.heartbeat.max(beat);
                    }
                    self.acknowledged.fetch_max(beat, Ordering::SeqCst);
                }
                continue;
            }
            if table.len() >= GOSSIP_NODES_MAX && !table.contains_key(&id) {
                continue;
            }
            let e = table.entry(id).or_insert(Entry {
                heartbeat: 0,
                seen_ms: now,
                state: State::Alive,
            });
            if beat > e.heartbeat {
                e.heartbeat = beat;
                e.seen_ms = now;
                // A new beat is proof of life: a suspect or dead peer is alive from now, not
                // from this node's next tick. A peer thawed just as this node called it dead
                // would otherwise stay dead in every gateway's view for up to an interval, and
                // its tenants be answered 503 though it serves.
                self.set_state(id, e, State::Alive);
            }
        }
        table.iter().map(|(id, e)| (*id, e.heartbeat)).collect()
    }

    /// Records `state` as node `id`'s (entry `e`); a change is logged and wakes the watchers.
    fn set_state(&self, id: u64, e: &mut Entry, state: State) {
        if state != e.state {
            tracing::info!(node = id, from = %e.state, to = %state, "gossip state changed");
            e.state = state;
            self.changed.store(true, Ordering::SeqCst);
            self.generation.send_modify(|g| *g += 1);
        }
        metrics::gauge!("sq_gossip_state", "peer" => id.to_string()).set(match state {
            State::Alive => 0.0,
            State::Suspect => 1.0,
            State::Dead => 2.0,
        });
    }

    /// Bumps this node's heartbeat and re-derives every state. Returns the table to send.
    pub(crate) fn tick(&self, peers: &[u64]) -> Vec<(u64, u64)> {
        let now = self.clock.now_ms();
        let mut table = self.lock();
        let mine = table.entry(self.me).or_insert(Entry {
            heartbeat: 0,
            seen_ms: now,
            state: State::Alive,
        });
        mine.heartbeat = mine.heartbeat.saturating_add(1);
        // This entry's `seen_ms` is the previous tick. A gap of more than two intervals is time
        // this node could not listen (a frozen process, a starved runtime): its peers' silence
        // over it is this node's, so it is not counted against them. Without this, a node
        // thawed from a pause holds every peer dead on its first tick, and a gateway taking its
        // view answers 503 until the next round.
        let missed = match now.saturating_sub(mine.seen_ms) {
            gap if gap > 2 * self.config.interval_ms => gap - self.config.interval_ms,
            _ => 0,
        };
        mine.seen_ms = now;
        for p in peers {
            table.entry(*p).or_insert(Entry { heartbeat: 0, seen_ms: now, state: State::Alive });
        }
        for (id, e) in table.iter_mut() {
            if missed > 0 && *id != self.me {
                e.seen_ms = e.seen_ms.saturating_add(missed).min(now);
            }
            let silent = now.saturating_sub(e.seen_ms);
            let state = if *id == self.me || silent < self.config.suspect_after_ms {
                State::Alive
            } else if silent < self.config.dead_after_ms {
                State::Suspect
            } else {
                State::Dead
            };
            self.set_state(*id, e, state);
        }
        table.iter().map(|(id, e)| (*id, e.heartbeat)).collect()
    }

    /// Watches the count of state changes.
    pub fn generations(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// True once after any state changed.
    pub fn changed_since_view(&self) -> bool {
        self.changed.swap(false, Ordering::SeqCst)
    }

    /// How many nodes the table holds.
    pub fn known_nodes(&self) -> usize {
        self.lock().len()
    }

    /// Every known node's state, sorted by id.
    pub fn snapshot(&self) -> Vec<(u64, State)> {
        let mut v: Vec<_> = self
            .lock()
            .iter()
            .map(|(id, e)| (*id, if *id == self.me { State::Alive } else { e.state }))
            .collect();
        v.sort_by_key(|(id, _)| *id);
        v
    }
}

/// The most nodes a gossip message may make this node remember. Heartbeats name node ids, and
/// every remembered id costs a table entry and a metrics series for good; a cluster has at most
/// `raft_registry::state::ACTIVE_NODES_MAX` active nodes, plus those joining or draining.
pub const GOSSIP_NODES_MAX: usize = 1024;

/// Sends this node's table to every peer each interval until `shutdown`.
pub async fn run(
    health: Arc<Health>,
    registry: Arc<raft_registry::Registry>,
    client: Arc<dyn transport::Caller>,
    shutdown: CancellationToken,
) {
    let interval = Duration::from_millis(health.config.interval_ms);
    loop {
        let state = registry.state();
        let peers: Vec<(u64, String)> = state
            .nodes()
            .filter(|n| n.id != health.me && n.state != NodeState::Removed)
            .map(|n| (n.id, n.addr.clone()))
            .collect();
        let ids: Vec<u64> = peers.iter().map(|(id, _)| *id).collect();
        let table = health.tick(&ids);
        for (id, addr) in peers {
            let Ok(addr) = addr.parse() else { continue };
            let request = NodeRequest::Gossip { from: health.me, heartbeats: table.clone() };
            let (client, health, registry) = (client.clone(), health.clone(), registry.clone());
            tokio::spawn(async move {
                let Ok(bytes) = proto::wire::encode(&request) else { return };
                // A gossip round may take at most one interval; a slow peer is simply missed.
                let Ok(answer) = client.call(addr, bytes.into(), interval).await else { return };
                match proto::wire::decode(&answer) {
                    Ok(NodeResponse::Gossip { heartbeats }) => {
                        health.merge(id, &heartbeats);
                    }
                    Ok(NodeResponse::Removed { applied }) => {
                        health.removal_claim(&registry, id, applied);
                    }
                    _ => {}
                }
            });
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// The most view pollers whose last health generation is remembered. Past it the memory is
/// cleared, which costs each gateway one extra view.
const VIEW_POLLERS_MAX: usize = 1024;

/// The gossip generation each view poller (a gateway, by its QUIC address) was last sent, so a
/// change that happens between two of its polls is sent at its next poll instead of being
/// missed until the registry moves.
#[derive(Default)]
pub struct ViewPeers(Mutex<HashMap<std::net::SocketAddr, u64>>);

impl ViewPeers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<std::net::SocketAddr, u64>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// True when `poller` was never sent a view built at gossip generation `generation`.
    pub fn behind(&self, poller: std::net::SocketAddr, generation: u64) -> bool {
        self.lock().get(&poller) != Some(&generation)
    }

    pub fn sent(&self, poller: std::net::SocketAddr, generation: u64) {
        let mut pollers = self.lock();
        if pollers.len() >= VIEW_POLLERS_MAX && !pollers.contains_key(&poller) {
            pollers.clear();
        }
        pollers.insert(poller, generation);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ticks `h` through the dead timeout with peer 2 silent.
    fn silence_of_peer_2(h: &Health, clock: &crate::store::ManualClock, config: GossipConfig) {
        for _ in 0..config.dead_after_ms / config.interval_ms {
            clock.advance_ms(config.interval_ms);
            h.tick(&[2]);
        }
    }

    // Goal: a node's verdict on itself never outranks its peers' (its version is what they told
    // it they saw), while a peer's
    // verdict carries the last counter seen of it, so a gateway takes "dead" from the survivors
    // over the last "alive" the dead node said of itself.
    #[test]
    fn a_verdict_on_itself_carries_no_version() {
        let clock = Arc::new(crate::store::ManualClock::new(0));
        let h = Health::new(1, GossipConfig::default(), clock.clone());
        h.merge(2, &[(2, 7)]);
        for _ in 0..5 {
            h.tick(&[2]);
        }
        assert_eq!(h.verdict(1), (State::Alive, 0), "no peer has told it a counter yet");
        h.merge(2, &[(1, 3)]);
        assert_eq!(h.verdict(1), (State::Alive, 3), "the counter its peer saw, not its own 5");
        assert_eq!(h.verdict(2), (State::Alive, 7));
        let config = GossipConfig::default();
        silence_of_peer_2(&h, &clock, config);
        assert_eq!(h.verdict(2), (State::Dead, 7));
    }

    // Goal: a pause of this node's own (no tick, no message for 10 s) is not its peers'
    // silence: after it, a peer heard just before stays alive, and goes suspect then dead only
    // after the usual silence counted from the end of the pause.
    #[test]
    fn its_own_pause_is_not_its_peers_silence() {
        let config = GossipConfig::default();
        let clock = Arc::new(crate::store::ManualClock::new(0));
        let h = Health::new(1, config, clock.clone());
        h.merge(2, &[(2, 1)]);
        h.tick(&[2]);
        clock.advance_ms(10_000);
        h.tick(&[2]);
        assert_eq!(h.of(2), State::Alive, "the pause was this node's");
        let mut dead_after = None;
        for step in 1..=40 {
            clock.advance_ms(config.interval_ms);
            h.tick(&[2]);
            if h.of(2) == State::Dead {
                dead_after = Some(step * config.interval_ms);
                break;
            }
        }
        // Counted from the tick before the pause plus one interval: the peer's last beat.
        let dead_after = dead_after.expect("a silent peer goes dead");
        assert!(
            (config.dead_after_ms - config.interval_ms..=config.dead_after_ms)
                .contains(&dead_after),
            "dead {dead_after} ms after the pause"
        );
        // A peer that keeps beating through ticks is never suspect.
        let h = Health::new(1, config, clock.clone());
        for beat in 1..=20 {
            h.merge(2, &[(2, beat)]);
            clock.advance_ms(config.interval_ms);
            h.tick(&[2]);
            assert_eq!(h.of(2), State::Alive);
        }
    }

    // Goal: a dead peer's next beat makes it alive at once, before this node's next tick, and
    // wakes whoever watches the states (the gateways' view polls); an old beat does not.
    #[test]
    fn a_new_beat_makes_a_dead_peer_alive_at_once() {
        let config = GossipConfig::default();
        let clock = Arc::new(crate::store::ManualClock::new(0));
        let h = Health::new(1, config, clock.clone());
        h.merge(2, &[(2, 7)]);
        silence_of_peer_2(&h, &clock, config);
        assert_eq!(h.verdict(2), (State::Dead, 7));
        let watch = h.generations();
        let _ = h.changed_since_view();
        h.merge(3, &[(2, 7)]);
        assert_eq!(h.verdict(2), (State::Dead, 7), "a beat already seen proves nothing");
        assert!(!h.changed_since_view());
        h.merge(2, &[(2, 8)]);
        assert_eq!(h.verdict(2), (State::Alive, 8));
        assert!(h.changed_since_view(), "a gateway's view poll is answered");
        assert!(watch.has_changed().expect("the sender lives"));
    }

    // Goal: the default timings pass the check, and timings where a node would be dead before
    // suspect, or suspect after a single missed round, are refused.
    #[test]
    fn config_check() {
        assert!(GossipConfig::default().check().is_ok());
        let bad = [(0, 1500, 3000), (250, 400, 3000), (250, 1500, 1500), (250, 3000, 1500)];
        for (interval_ms, suspect_after_ms, dead_after_ms) in bad {
            let c = GossipConfig { interval_ms, suspect_after_ms, dead_after_ms };
            assert!(c.check().is_err(), "{c:?}");
        }
    }
}
