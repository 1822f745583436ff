//! The invariants, and the monitor that checks the cluster-side ones while the run goes.
//!
//! Client-side checks (what reads return, quota) live in [`crate::model`]; this monitor watches
//! what only the simulator can see: each node's Raft role and term, the registry state each node
//! applies at each log index, and which node answered which tenant under which registry state.
//! The first violation stops the run.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use raft_registry::RegistryState;

use crate::trace::Trace;

/// The promises the simulator holds the cluster to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Invariant {
    LostWrite,
    StaleRead,
    OneOwner,
    Deposed,
    Isolation,
    Auth,
    Quota,
    WrongfulRefusal,
    RaftLeader,
    RaftLog,
    Liveness,
    Panic,
    ReplicasIdentical,
    IdleQuiet,
    IdleForgotten,
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Invariant::LostWrite => "no acknowledged write is lost",
            Invariant::StaleRead => {
                "a read sees the latest acknowledged write of its tenant, and a session's reads never go back"
            }
            Invariant::OneOwner => "at most one node serves a tenant in any placement epoch",
            Invariant::Deposed => {
                "a node serves a tenant no more once another has served it as a later primary"
            }
            Invariant::Isolation => "a tenant never reads another's data",
            Invariant::Auth => {
                "a revoked key, or a disabled, archived or purged tenant's key, gets 401 or 403, never data"
            }
            Invariant::Quota => "quota is never exceeded",
            Invariant::WrongfulRefusal => {
                "507 and 429 only when the quota and limit in force say so"
            }
            Invariant::RaftLeader => {
                "Raft: one leader per term"
            }
            Invariant::RaftLog => "Raft: committed entries are never lost or reordered",
            Invariant::Liveness => {
                "liveness: after faults heal, the cluster converges and serves every tenant"
            }
            Invariant::Panic => "no node code panics (a broken assertion)",
            Invariant::ReplicasIdentical => {
                "after the heal, every replica of a tenant holds the same log end and the same bytes"
            }
            Invariant::IdleQuiet => "an idle tenant's replicas exchange no messages",
            Invariant::IdleForgotten => {
                "a tenant idle for long costs its primary no replication state, and is served again"
            }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub invariant: Invariant,
    pub detail: String,
}

impl Violation {
    pub fn new(invariant: Invariant, detail: impl Into<String>) -> Violation {
        Violation { invariant, detail: detail.into() }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.invariant, self.detail)
    }
}

/// Registry states a node published, newest last, kept for the serving check.
const HISTORY_PER_NODE_MAX: usize = 64;

#[derive(Default)]
struct Inner {
    violation: Option<Violation>,
    /// Term → the nodes seen leading it.
    leaders: BTreeMap<u64, BTreeSet<u64>>,
    /// Node → the term it leads now (as last sampled).
    leading: BTreeMap<u64, u64>,
    /// Node → the incarnation of its process at the last sample.
    incarnations: BTreeMap<u64, u64>,
    /// (term, node) reigns that ended: the node stopped leading, or died.
    ended: BTreeSet<(u64, u64)>,
    /// Log index → (first node seen applying it, the state after it).
    applied: BTreeMap<u64, (u64, Arc<RegistryState>)>,
    /// Node → (time, state) of its recent publications.
    history: BTreeMap<u64, VecDeque<(u64, Arc<RegistryState>)>>,
    /// (tenant, epoch) → the node that served it in that epoch.
    servers: BTreeMap<(String, u64), u64>,
    /// Tenant → the latest placement epoch it was served in so far, and the node that served it.
    latest: BTreeMap<String, (u64, u64)>,
    pub served: u64,
    /// The simulated time span in which finished handoffs are counted, and the count.
    handoff_window: Option<(u64, u64)>,
    handoffs_done: u64,
    /// Registry entries in the window that changed a node's membership state.
    membership_changes: u64,
}

pub struct Monitor {
    trace: Arc<Trace>,
    inner: Mutex<Inner>,
}

impl Monitor {
    pub fn new(trace: Arc<Trace>) -> Monitor {
        Monitor { trace, inner: Mutex::new(Inner::default()) }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a violation; only the first one counts.
    pub fn report(&self, v: Violation) {
        let mut inner = self.lock();
        if inner.violation.is_none() {
            self.trace.event(format!("VIOLATION {v}"));
            inner.violation = Some(v);
        }
    }

    /// Reports `result` if it is a violation.
    pub fn check(&self, result: Result<(), Violation>) {
        if let Err(v) = result {
            self.report(v);
        }
    }

    pub fn violation(&self) -> Option<Violation> {
        self.lock().violation.clone()
    }

    /// How many answered requests the serving check saw.
    pub fn served(&self) -> u64 {
        self.lock().served
    }

    /// One sample of who leads: `running` lists the node processes up (node, incarnation),
    /// `leading` holds (node, term) for every one that says it leads. The registry runs standard
    /// Raft (openraft's `single-term-leader`): a term has at most one leader, and it reigns once:
    /// a process that stepped down from a term and leads it again has lost its vote. (A leader that restarts may resume its reign: openraft restores it from the durable
    /// vote and log.)
    pub fn leaders(&self, running: &[(u64, u64)], leading: &[(u64, u64)]) {
        let mut found = None;
        {
            let mut inner = self.lock();
            let now: BTreeMap<u64, u64> = leading.iter().copied().collect();
            let same_process: Vec<u64> = running
                .iter()
                .filter(|(n, inc)| inner.incarnations.get(n) == Some(inc))
                .map(|(n, _)| *n)
                .collect();
            let stopped: Vec<(u64, u64)> = inner
                .leading
                .iter()
                .filter(|(n, t)| same_process.contains(n) && now.get(n) != Some(t))
                .map(|(n, t)| (*t, *n))
                .collect();
            inner.incarnations = running.iter().copied().collect();
            inner.ended.extend(stopped);
            for &(node, term) in leading {
                if inner.ended.contains(&(term, node)) {
                    found = Some(format!("node {node} led term {term} again after its reign in that term ended: its vote went back"));
                }
                let others = inner.leaders.entry(term).or_default();
                if others.insert(node) {
                    self.trace.event(format!("n{node} leads term {term}"));
                    if others.len() > 1 {
                        found = Some(format!("nodes {others:?} all led term {term}"));
                    }
                }
            }
            inner.leading = now;
        }
        if let Some(detail) = found {
            self.report(Violation::new(Invariant::RaftLeader, detail));
        }
    }

    /// Counts, from now until [`Monitor::end_handoff_window`], the handoffs that finish (a
    /// pending handoff that leaves the registry while its tenant stays) and the membership
    /// changes.
    pub fn start_handoff_window(&self, now_ms: u64) {
        self.lock().handoff_window = Some((now_ms, u64::MAX));
    }

    pub fn end_handoff_window(&self, now_ms: u64) {
        if let Some(w) = self.lock().handoff_window.as_mut() {
            w.1 = now_ms;
        }
    }

    /// Handoffs that finished within the window.
    pub fn handoffs_done(&self) -> u64 {
        self.lock().handoffs_done
    }

    /// Registry entries within the window that changed a node's membership state (joining,
    /// active, draining, removed).
    pub fn membership_changes(&self) -> u64 {
        self.lock().membership_changes
    }

    /// `node` applied the log up to `index`, reaching `state`.
    pub fn applied(&self, node: u64, index: u64, state: Arc<RegistryState>, now_ms: u64) {
        let clash = {
            let mut inner = self.lock();
            let history = inner.history.entry(node).or_default();
            history.push_back((now_ms, state.clone()));
            if history.len() > HISTORY_PER_NODE_MAX {
                history.pop_front();
            }
            match inner.applied.get(&index) {
                Some((first, seen)) if **seen != *state => Some(*first),
                Some(_) => None,
                None => {
                    let in_window =
                        inner.handoff_window.is_some_and(|(a, b)| (a..=b).contains(&now_ms));
                    let before =
                        inner.applied.range(..index).next_back().map(|(_, (_, s))| s.clone());
                    let done = match &before {
                        Some(before) if in_window => before
                            .handoffs()
                            .filter(|h| {
                                state.handoff(&h.tenant).is_none()
                                    && state.tenant(&h.tenant).is_some()
                            })
                            .count() as u64,
                        _ => 0,
                    };
                    inner.handoffs_done += done;
                    let moved = match &before {
                        Some(before) if in_window => {
                            let of = |s: &RegistryState| -> Vec<(u64, raft_registry::NodeState)> {
                                s.nodes().map(|n| (n.id, n.state)).collect()
                            };
                            of(before) != of(&state)
                        }
                        _ => false,
                    };
                    inner.membership_changes += u64::from(moved);
                    inner.applied.insert(index, (node, state));
                    None
                }
            }
        };
        if let Some(first) = clash {
            self.report(Violation::new(
                Invariant::RaftLog,
                format!("node {node} applied log index {index} to a registry state other than node {first} reached at that index"),
            ));
        }
    }

    /// `node` answered a request of `tenant` with success, having checked ownership under one of
    /// the registry states it held between `since_ms` (delivery) and now. Those are the states at
    /// delivery and now, and any it published in between.
    ///
    /// The request carried `key_hash`: one of those states must also accept it (the tenant
    /// there, enabled, not archived, the key one of its keys), as the node checks again
    /// whatever the gateway's view said.
    pub fn served_by(
        &self,
        node: u64,
        tenant: &str,
        key_hash: &str,
        since_ms: u64,
        at_delivery: &Arc<RegistryState>,
        now: &Arc<RegistryState>,
    ) {
        let result = {
            let mut inner = self.lock();
            inner.served += 1;
            let mut states: Vec<Arc<RegistryState>> = vec![at_delivery.clone(), now.clone()];
            if let Some(h) = inner.history.get(&node) {
                states.extend(h.iter().filter(|(t, _)| *t >= since_ms).map(|(_, s)| s.clone()));
            }
            let accepted = states.iter().any(|s| {
                s.tenant(tenant).is_some_and(|t| {
                    t.enabled && !t.archived && t.key_hashes.iter().any(|h| h == key_hash)
                })
            });
            let owning: Vec<u64> = states
                .iter()
                // With R = 1 a tenant moving to its new owner is served by neither until it
                // arrived; with R > 1 its primary serves throughout a change of its set.
                .filter(|s| {
                    s.primary_of(tenant) == Some(node)
                        && (s.replicas() > 1 || s.handoff(tenant).is_none())
                })
                .map(|s| s.placement_epoch())
                .collect();
            if accepted {
                check_owner(&mut inner, node, tenant, &states, &owning)
            } else {
                let short: String = key_hash.chars().take(12).collect();
                Err(Violation::new(
                    Invariant::Auth,
                    format!("node {node} served tenant {tenant} with key hash {short}… that no registry state it held accepted"),
                ))
            }
        };
        if let Err(v) = result {
            self.report(v);
        }
    }
}

fn check_owner(
    inner: &mut Inner,
    node: u64,
    tenant: &str,
    states: &[Arc<RegistryState>],
    owning: &[u64],
) -> Result<(), Violation> {
    let Some(&epoch) = owning.first() else {
        let epochs: Vec<String> = states
            .iter()
            .map(|s| {
                format!(
                    "epoch {} primary {:?}{}",
                    s.placement_epoch(),
                    s.primary_of(tenant),
                    if s.handoff(tenant).is_some() { " (handoff pending)" } else { "" }
                )
            })
            .collect();
        return Err(Violation::new(
            Invariant::OneOwner,
            format!("node {node} served tenant {tenant} without being its primary in any registry state it held: {}", epochs.join(", ")),
        ));
    };
    deposed_check(inner, node, tenant, owning)?;
    if owning.iter().any(|e| *e != epoch) {
        return Ok(());
    }
    match inner.servers.get(&(tenant.to_string(), epoch)) {
        Some(&other) if other != node => Err(Violation::new(
            Invariant::OneOwner,
            format!(
                "nodes {other} and {node} both served tenant {tenant} in placement epoch {epoch}"
            ),
        )),
        Some(_) => Ok(()),
        None => {
            inner.servers.insert((tenant.to_string(), epoch), node);
            Ok(())
        }
    }
}

/// [`Invariant::Deposed`]: `node` served `tenant` as its primary in the placement epochs
/// `owning` (of the registry states it held while it handled the request); no other node may have
/// served it already in a later epoch. A primary that did had gathered the promises of every
/// member not marked down first, and a member that promises a new primary answers no request
/// as the old one from then on (its check that it still leads comes last); a node marked down
/// holds no lease. Then records the latest epoch the tenant was served in.
fn deposed_check(
    inner: &mut Inner,
    node: u64,
    tenant: &str,
    owning: &[u64],
) -> Result<(), Violation> {
    let Some(&newest) = owning.iter().max() else { return Ok(()) };
    match inner.latest.get(tenant).copied() {
        Some((epoch, other)) if other != node && epoch > newest => Err(Violation::new(
            Invariant::Deposed,
            format!(
                "node {node} served tenant {tenant} as its primary in placement epoch {newest} \
                 after node {other} had served it as its primary in epoch {epoch}"
            ),
        )),
        Some((epoch, _)) if epoch >= newest => Ok(()),
        _ => {
            inner.latest.insert(tenant.to_string(), (newest, node));
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use raft_registry::command::{apply, Command};
    use raft_registry::{key_hash, TenantRecord, Tier};

    use super::*;
    use crate::trace::Verbosity;

    fn monitor() -> Monitor {
        Monitor::new(Arc::new(Trace::new(Verbosity::Quiet)))
    }

    /// A registry where nodes 1 and 2 are active and tenant `t` exists.
    fn state() -> RegistryState {
        let mut s = RegistryState::default();
        for id in [1, 2] {
            apply(&mut s, Command::NodeJoin { id, addr: format!("10.0.0.{id}:7100") }).unwrap();
            apply(&mut s, Command::NodeActivate { id }).unwrap();
        }
        apply(
            &mut s,
            Command::AddTenant(TenantRecord::new("t".into(), Tier::Free, key_hash("k"), 0)),
        )
        .unwrap();
        s
    }

    // Goal: the monitor catches planted Raft violations: two leaders in one term, and two states
    // at one log index.
    #[tokio::test(start_paused = true)]
    async fn planted_raft_violations_are_caught() {
        let m = monitor();
        m.leaders(&[(1, 1), (2, 1)], &[(1, 3)]);
        m.leaders(&[(1, 2), (2, 1)], &[]);
        m.leaders(&[(1, 2), (2, 1)], &[(1, 3)]);
        assert_eq!(m.violation(), None, "a leader may resume its reign after a restart");
        m.leaders(&[(1, 2), (2, 1)], &[(2, 4)]);
        assert_eq!(m.violation(), None);
        m.leaders(&[(1, 2), (2, 1)], &[(1, 3)]);
        assert_eq!(
            m.violation().map(|v| v.invariant),
            Some(Invariant::RaftLeader),
            "node 1 stepped down from term 3"
        );
        let two = monitor();
        two.leaders(&[(1, 1), (2, 1)], &[(1, 3), (2, 3)]);
        assert_eq!(two.violation().map(|v| v.invariant), Some(Invariant::RaftLeader));

        let m = monitor();
        m.applied(1, 7, Arc::new(state()), 0);
        m.applied(2, 7, Arc::new(state()), 1);
        assert_eq!(m.violation(), None);
        m.applied(3, 7, Arc::new(RegistryState::default()), 2);
        assert_eq!(m.violation().map(|v| v.invariant), Some(Invariant::RaftLog));
    }

    // Goal: a node that serves a tenant it does not own is caught; the owner is not.
    #[tokio::test(start_paused = true)]
    async fn planted_foreign_serving_is_caught() {
        let s = Arc::new(state());
        let owner = s.owner_of("t").unwrap();
        let other = if owner == 1 { 2 } else { 1 };
        let m = monitor();
        let k = key_hash("k");
        m.served_by(owner, "t", &k, 0, &s, &s);
        assert_eq!(m.violation(), None);
        m.served_by(other, "t", &k, 0, &s, &s);
        assert_eq!(m.violation().map(|v| v.invariant), Some(Invariant::OneOwner));
    }

    // Goal: a primary serving its tenant after a later primary served it (the old one marked
    // down, then the new one served) is caught; the later primary serving again, and the old
    // one before, are not.
    #[tokio::test(start_paused = true)]
    async fn planted_deposed_serving_is_caught() {
        let mut two = state();
        apply(&mut two, Command::ChangeReplicas { replicas: 2 }).unwrap();
        let epoch = two.placement_epoch();
        apply(&mut two, Command::HandoffDone { tenant: "t".into(), epoch }).unwrap();
        let before = Arc::new(two.clone());
        let old = before.primary_of("t").unwrap();
        apply(&mut two, Command::MarkDownAfter { id: old, last_mark: 0 }).unwrap();
        let after = Arc::new(two);
        let new = after.primary_of("t").unwrap();
        assert_ne!(old, new, "marked down, the old primary leads no more");
        let k = key_hash("k");
        let m = monitor();
        m.served_by(old, "t", &k, 0, &before, &before);
        m.served_by(new, "t", &k, 0, &after, &after);
        m.served_by(new, "t", &k, 0, &after, &after);
        assert_eq!(m.violation(), None);
        m.served_by(old, "t", &k, 0, &before, &before);
        assert_eq!(m.violation().map(|v| v.invariant), Some(Invariant::Deposed));
    }

    // Goal: the owner serving a key its registry does not hold (rotated away), or a disabled
    // tenant, is caught; the owner serving the tenant's key is not.
    #[tokio::test(start_paused = true)]
    async fn planted_revoked_key_serving_is_caught() {
        let s = Arc::new(state());
        let owner = s.owner_of("t").unwrap();
        let m = monitor();
        m.served_by(owner, "t", &key_hash("k"), 0, &s, &s);
        assert_eq!(m.violation(), None);
        m.served_by(owner, "t", &key_hash("old"), 0, &s, &s);
        assert_eq!(m.violation().map(|v| v.invariant), Some(Invariant::Auth));
        let mut disabled = (*s).clone();
        let patch = Command::UpdateTenant {
            id: "t".into(),
            tier: None,
            quota_bytes: None,
            daily_limit: None,
            enabled: Some(false),
        };
        apply(&mut disabled, patch).unwrap();
        let disabled = Arc::new(disabled);
        let m = monitor();
        m.served_by(owner, "t", &key_hash("k"), 0, &disabled, &disabled);
        assert_eq!(m.violation().map(|v| v.invariant), Some(Invariant::Auth));
    }
}
