//! A tenant's writes copied from its primary to its backups (docs/REPLICATION.md, "Writes").
//!
//! The primary is the first node of the tenant's replica set not marked down
//! (`RegistryState::primary_of`); the other members are its backups. A write is answered only
//! once a majority of the set holds it durably, the primary's own copy counting as one
//! ([`Replication::commit`]): with R = 3, the primary and one backup. A read waits the same way
//! for every write it could have seen, so nothing a client was shown can be lost with one node.
//!
//! One [`Link`] per backup node carries the records of all the tenants this node is primary of
//! to that node, one `Replicate` message in flight at a time: records logged while a message is
//! on its way go together in the next one, so the messages between two nodes are batched by
//! themselves, whatever the number of tenants. Records are shipped once they are durable here,
//! from the copy the tenant keeps in memory (`Store::shipment`), so a primary that restarts never
//! holds less than a backup it sent to.
//!
//! A backup checks each append ([`take`]): the sender must be the tenant's primary in its own
//! registry, the ballot must not be below its promise, and the records must continue its log;
//! it answers where its log ends once the records are durable, or, when the logs differ, with
//! its ballot history, from which the primary finds the last record both share and asks it to
//! cut the rest. An idle tenant has no link entry with work, no timer and no message.
//!
//! A node that becomes a tenant's primary under a new ballot runs a prepare round first
//! ([`Replication::prepare`]). Reads are served only under the node's lease (`crate::lease`).
//! A backup whose log no longer meets the primary's is asked to take a snapshot
//! (`crate::catchup`), and so is a new primary whose log differs from the most advanced one
//! below what either still holds as records.
//!
//! The parts: this file holds [`Replication`] and the commit rule; `link` the primary's side of
//! shipping (its links, what it knows of each backup, the send loop); `prepare` the change of
//! primary; `backup` what a member answers a primary.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use proto::cluster::{NodeRequest, NodeResponse, ReplicaAppend, ReplicaStatus};
use proto::ApiError;
use tokio::sync::watch;

use crate::store::Store;

mod backup;
mod link;
mod prepare;

pub(crate) use backup::refusal;
pub use backup::{entering, fetch, promise, take};
use link::{Link, Stuck};

/// How long a write waits for enough backups to hold it before it is answered 503 (its outcome
/// is then unknown, as after a timeout: it may still be committed).
pub const REPLICA_ACK_WAIT: Duration = Duration::from_secs(2);

/// How long one `Replicate` message may take before its backup is treated as unreachable.
const REPLICATE_CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// This node's side of replication as a primary: its links to backups and the ballots its
/// tenants are written under.
pub struct Replication {
    id: u64,
    me: Weak<Replication>,
    store: Arc<Store>,
    peers: Arc<dyn transport::Caller>,
    registry: Arc<raft_registry::Registry>,
    /// What a snapshot is copied with (a new primary that must take one before it serves).
    handoffs: Arc<crate::handoff::Handoffs>,
    clock: Arc<dyn crate::store::Clock>,
    links: Mutex<BTreeMap<u64, Arc<Link>>>,
    /// Bumped after every answer from a backup: writes waiting for acknowledgements look again.
    acks: watch::Sender<u64>,
    /// The ballot each tenant was last prepared under here, so a request prepares only when the
    /// placement epoch moved.
    led: Mutex<HashMap<String, u64>>,
    /// Where each tenant's log ended when this node last prepared it: a learner holding that
    /// much holds every acknowledged write, and counts from then on.
    prepared_end: Mutex<HashMap<String, u64>>,
    /// One prepare at a time per tenant.
    preparing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// When a request last prepared or committed each tenant led here, on the node's clock: a
    /// tenant idle for [`LED_IDLE_FORGET_MS`] is forgotten ([`Replication::forget_idle`]).
    used_ms: Mutex<HashMap<String, u64>>,
}

/// How long a tenant this node leads may go without a request before the node drops what it
/// keeps for it (the ballot it leads under, where it prepared, what each backup holds), once
/// every backup holds all it was sent: an idle replica costs the store's slot only. The next
/// request prepares it again (one round trip to the other members). Far longer than any
/// request runs, so no request loses its ballot while it waits.
pub const LED_IDLE_FORGET_MS: u64 = 60_000;

/// Runs store work off the async threads; a store error is a 503 or 500 as the store says.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    crate::blocking::spawn(f)
        .await
        .map_err(|e| ApiError::Internal(format!("store task failed: {e}")))?
        .map_err(ApiError::from)
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().expect("replication lock poisoned: a thread panicked while holding it")
}

impl Replication {
    pub fn new(
        id: u64,
        store: Arc<Store>,
        peers: Arc<dyn transport::Caller>,
        registry: Arc<raft_registry::Registry>,
        handoffs: Arc<crate::handoff::Handoffs>,
        clock: Arc<dyn crate::store::Clock>,
    ) -> Arc<Replication> {
        Arc::new_cyclic(|me| Replication {
            id,
            me: me.clone(),
            store,
            peers,
            registry,
            handoffs,
            clock,
            links: Mutex::new(BTreeMap::new()),
            acks: watch::channel(0).0,
            led: Mutex::new(HashMap::new()),
            prepared_end: Mutex::new(HashMap::new()),
            preparing: Mutex::new(HashMap::new()),
            used_ms: Mutex::new(HashMap::new()),
        })
    }

    /// Prepares the tenant here if this node is its primary, with R > 1 ([`Self::prepare`]): the
    /// ballot it leads under, `None` when it is not the primary. Refused for a tenant no longer
    /// in the registry (purged): it has nothing to prepare.
    pub async fn prepare_if_primary(&self, tenant: &str) -> Result<Option<u64>, ApiError> {
        let state = self.registry.state();
        if state.tenant(tenant).is_none() {
            return Err(ApiError::Missing(format!("no tenant {tenant:?} in this node's registry")));
        }
        let (backups, needed) = backups(&state.replica_set(tenant), self.id);
        if needed == 0 || state.primary_of(tenant) != Some(self.id) {
            return Ok(None);
        }
        let ballot = state.placement_epoch();
        self.prepare(tenant, ballot, &backups, needed).await.map(Some)
    }

    /// [`Self::prepare_if_primary`] in the background, if this node leads the tenant in its
    /// registry and has not prepared it at the registry's epoch: called when a node that led the
    /// tenant before sends it something ([`refusal`]). That node may hold records this one
    /// lacks, or have left a backup behind, and without this an idle tenant would stay so until
    /// a client's request made this node prepare.
    pub(crate) fn prepare_soon(&self, tenant: &str) {
        let state = self.registry.state();
        let ballot = state.placement_epoch();
        if state.primary_of(tenant) != Some(self.id)
            || locked(&self.led).get(tenant).is_some_and(|&led| led >= ballot)
        {
            return;
        }
        let Some(me) = self.me.upgrade() else { return };
        let tenant = tenant.to_string();
        tokio::spawn(async move {
            match me.prepare_if_primary(&tenant).await {
                Ok(led) => tracing::debug!(
                    node = me.id,
                    tenant,
                    ?led,
                    "prepared on word of a former primary"
                ),
                Err(e) => {
                    tracing::debug!(node = me.id, tenant, error = %e, "preparing on word of a former primary failed; the next request prepares")
                }
            }
        });
    }

    /// This node promised `ballot` to another node preparing the tenant: if it led the tenant
    /// under an older ballot, it no longer does. A read it runs under that ballot fails its last
    /// check ([`Self::commit`]'s), so no read it answers can miss a write the new primary
    /// acknowledges once it has this promise.
    ///
    /// It stops following the tenant's backups too, as a prepare does (the new primary adopts
    /// the most advanced log among the promises, this one's included); a follow left behind
    /// would wait for a catch-up this node no longer asks for, and keep the tenant's state here
    /// for good (seed 13753 of `--replicas 3`).
    pub(crate) fn step_down(&self, tenant: &str, ballot: u64) {
        let mut led = locked(&self.led);
        if led.get(tenant).is_none_or(|&l| l >= ballot) {
            return;
        }
        led.remove(tenant);
        drop(led);
        for link in locked(&self.links).values() {
            link.forget(tenant);
        }
    }

    /// This node led the tenant under `led`, and its registry now names another primary: it
    /// tells that node with an append of no records at this node's log end, which the new
    /// primary refuses ([`refusal`]) and which makes it prepare the tenant
    /// ([`Self::prepare_soon`]). Called when records or a catch-up this node still had to send
    /// are dropped: it may hold records the new primary lacks, or leave a backup behind.
    fn hand_over(&self, tenant: &str, led: u64) {
        let state = self.registry.state();
        let Some(primary) = state.primary_of(tenant).filter(|&p| p != self.id) else { return };
        let Some(me) = self.me.upgrade() else { return };
        let tenant = tenant.to_string();
        tokio::spawn(async move {
            let (store, owned) = (me.store.clone(), tenant.clone());
            let Ok(Ok(mine)) = crate::blocking::spawn(move || store.replica_state(&owned)).await
            else {
                return;
            };
            // As a primary's probe of a backup's end is: no records, at this node's end.
            let end = mine.position();
            let append = ReplicaAppend {
                tenant: tenant.clone(),
                epoch: led,
                ballot: end.ballot,
                prev_ballot: end.ballot,
                prev_lsn: end.lsn,
                truncate_after: None,
                truncate_if_end: 0,
                records: Vec::new(),
                caught_up: false,
            };
            let answer = me
                .call(primary, NodeRequest::Replicate { from: me.id, appends: vec![append] })
                .await;
            tracing::debug!(
                node = me.id,
                tenant,
                primary,
                ?answer,
                "told the tenant's new primary"
            );
        });
    }

    fn copier(&self) -> crate::handoff::Copier<'_> {
        crate::handoff::Copier {
            peers: self.peers.as_ref(),
            store: &self.store,
            handoffs: &self.handoffs,
            clock: self.clock.as_ref(),
        }
    }

    /// Returns once `needed` of `backups` hold the tenant's records up to `lsn` durably, or
    /// 503 after [`REPLICA_ACK_WAIT`]. The records were written or read while this node led the
    /// tenant under `ballot` ([`Self::prepare`]); if it prepared again since, a new primary's
    /// log may have replaced them before this one took the tenant back, and backups holding
    /// *an* lsn this far prove nothing: 503, outcome unknown.
    pub async fn commit(
        &self,
        tenant: &str,
        lsn: u64,
        ballot: u64,
        backups: &[u64],
        needed: usize,
    ) -> Result<(), ApiError> {
        if needed == 0 {
            return Ok(());
        }
        self.used(tenant);
        let still_led = |me: &Self| {
            if locked(&me.led).get(tenant) == Some(&ballot) {
                Ok(())
            } else {
                Err(ApiError::unavailable(format!(
                    "this node no longer leads the tenant under ballot {ballot}: it prepared \
                     again, or promised a new primary, while the request waited; its outcome \
                     is unknown"
                )))
            }
        };
        // Checked for a read of a tenant that logged nothing yet too: its answer stands only if
        // no new primary can have written meanwhile.
        still_led(self)?;
        if lsn == 0 {
            return Ok(());
        }
        let mut acks = self.acks.subscribe();
        let links: Vec<Arc<Link>> = backups.iter().map(|&b| self.link(b)).collect();
        for link in &links {
            link.want(tenant, lsn);
        }
        let deadline = tokio::time::Instant::now() + REPLICA_ACK_WAIT;
        loop {
            let held = links.iter().filter(|l| l.member_durable(tenant) >= Some(lsn)).count();
            if held >= needed && self.held_after_change(tenant, lsn) {
                return still_led(self);
            }
            match tokio::time::timeout_at(deadline, acks.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    crate::metrics::replication_timeout();
                    return Err(ApiError::unavailable(format!(
                        "{held} of the tenant's {} backups hold the write and {needed} must; \
                         its outcome is unknown",
                        backups.len()
                    )));
                }
            }
        }
    }

    /// While the tenant's replica set changes, whether a majority of the set after the change
    /// holds record `lsn` durably (this node counting if it is in that set); true when no change
    /// is pending. A majority of the set during the change (R + 1 members) meets that of the set
    /// after it only when R is odd and R members are active: with fewer active nodes than R (a
    /// set of 2 growing back), or an even R, a write held by this node and the leaving one alone
    /// would be on no majority once the leaving node is out (the simulator's seed 701470 of
    /// `--replicas 3`: such writes were cut by a later primary). So during a change a write
    /// counts only once both majorities hold it: Raft's joint consensus.
    fn held_after_change(&self, tenant: &str, lsn: u64) -> bool {
        let state = self.registry.state();
        if state.replica_change(tenant).is_none() {
            return true;
        }
        let after = state.settled_set(tenant);
        majority_holds(&after, |n| n == self.id || self.link(n).member_durable(tenant) >= Some(lsn))
    }

    /// Whether node `entering`, coming into the tenant's replica set (a pending change in this
    /// node's registry), holds the tenant now, so the change may be committed: this node leads
    /// the tenant under a ballot at or after the change's epoch, so it prepared with the set of
    /// the change (R + 1 members, whose majorities meet those of the set before and after);
    /// the entering node holds everything this node held then, durably; and so does a majority
    /// of the set after the change. Every write acknowledged before is then on that majority
    /// (the records a prepare adopts come before its barrier), and every write after it is too
    /// (a write during a change counts only once that majority holds it:
    /// [`Self::held_after_change`]). Until then, it asks for the entering node's copy to be
    /// brought up.
    pub fn entered(&self, tenant: &str, entering: u64) -> bool {
        let state = self.registry.state();
        let Some(change) = state.replica_change(tenant) else { return false };
        let led = locked(&self.led).get(tenant).copied();
        let end = locked(&self.prepared_end).get(tenant).copied();
        let (Some(led), Some(end)) = (led, end) else { return false };
        if led < change.epoch || change.to != entering {
            return false;
        }
        let holds = |node: u64| {
            node == self.id || self.link(node).member_durable(tenant).is_some_and(|d| d >= end)
        };
        if !holds(entering) {
            self.link(entering).want(tenant, end);
            return false;
        }
        majority_holds(&state.settled_set(tenant), holds)
    }

    /// A request prepares or commits the tenant now.
    fn used(&self, tenant: &str) {
        let now = self.clock.now_ms();
        let mut used = locked(&self.used_ms);
        // Every request comes here twice: a known tenant's name is not allocated again.
        match used.get_mut(tenant) {
            Some(at) => *at = now,
            None => {
                used.insert(tenant.to_string(), now);
            }
        }
    }

    /// Drops what this node keeps for each tenant it leads that no request used for
    /// [`LED_IDLE_FORGET_MS`] and whose every backup holds all it was sent (nothing to send,
    /// cut or promote): its ballot, where it prepared, its prepare gate and each link's follow.
    /// Called by the node's sweeper. Returns how many tenants were forgotten.
    pub fn forget_idle(&self) -> usize {
        let now = self.clock.now_ms();
        let idle: Vec<String> = locked(&self.used_ms)
            .iter()
            .filter(|(_, &at)| now.saturating_sub(at) >= LED_IDLE_FORGET_MS)
            .map(|(t, _)| t.clone())
            .collect();
        let links: Vec<Arc<Link>> = locked(&self.links).values().cloned().collect();
        let mut forgotten = 0;
        for tenant in idle {
            if !links.iter().all(|l| l.settled(&tenant)) {
                continue;
            }
            // Checked again under the lock a request takes first (`used`): one that came
            // meanwhile keeps the tenant; one that comes after finds no ballot and prepares.
            let mut used = locked(&self.used_ms);
            if used.get(&tenant).is_some_and(|&at| now.saturating_sub(at) < LED_IDLE_FORGET_MS) {
                continue;
            }
            // A prepare running now holds the gate: the tenant is in use after all.
            let mut preparing = locked(&self.preparing);
            if preparing.get(&tenant).is_some_and(|g| Arc::strong_count(g) > 1) {
                continue;
            }
            preparing.remove(&tenant);
            used.remove(&tenant);
            locked(&self.led).remove(&tenant);
            locked(&self.prepared_end).remove(&tenant);
            // Before `used` is let go: a prepare waiting on it follows the backups afresh.
            for link in &links {
                link.forget(&tenant);
            }
            drop((preparing, used));
            forgotten += 1;
        }
        if forgotten > 0 {
            crate::memory::shrink(&mut locked(&self.used_ms));
            crate::memory::shrink(&mut locked(&self.preparing));
            crate::memory::shrink(&mut locked(&self.led));
            crate::memory::shrink(&mut locked(&self.prepared_end));
            for link in &links {
                crate::memory::shrink(&mut locked(&link.state).follows);
            }
        }
        forgotten
    }

    /// How many tenants this node keeps replication state for as their primary.
    pub fn led_count(&self) -> usize {
        let counts = [
            locked(&self.led).len(),
            locked(&self.prepared_end).len(),
            locked(&self.preparing).len(),
            locked(&self.used_ms).len(),
        ];
        let follows =
            locked(&self.links).values().map(|l| locked(&l.state).follows.len()).max().unwrap_or(0);
        counts.into_iter().chain([follows]).max().unwrap_or(0)
    }

    /// How this node, as primary, sees each of the tenant's `backups`.
    pub fn statuses(&self, tenant: &str, backups: &[u64], last_lsn: u64) -> Vec<ReplicaStatus> {
        backups
            .iter()
            .map(|&node| {
                let link = locked(&self.links).get(&node).cloned();
                let (follow, unreachable) = match &link {
                    Some(l) => {
                        let st = locked(&l.state);
                        (st.follows.get(tenant).copied(), st.unreachable)
                    }
                    None => (None, false),
                };
                let durable_lsn = follow.and_then(|f| f.durable);
                let state = match follow.and_then(|f| f.stuck) {
                    Some(Stuck::NeedsSnapshot) => "needs-snapshot",
                    None if follow.is_some_and(|f| f.learner) => "learner",
                    None if unreachable => "unreachable",
                    None if durable_lsn >= Some(last_lsn) => "in-sync",
                    None if follow.is_none() && last_lsn == 0 => "in-sync",
                    None => "behind",
                };
                ReplicaStatus { node, durable_lsn, state: state.to_string() }
            })
            .collect()
    }

    async fn call(&self, node: u64, request: NodeRequest) -> Result<NodeResponse, String> {
        let state = self.registry.state();
        let Some(record) = state.node(node) else {
            return Err(format!("node {node} is not in the registry"));
        };
        let addr: std::net::SocketAddr =
            record.addr.parse().map_err(|e| format!("bad address {:?}: {e}", record.addr))?;
        let bytes = proto::wire::encode(&request).map_err(|e| e.to_string())?;
        let answer = self
            .peers
            .call(addr, bytes.into(), REPLICATE_CALL_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        proto::wire::decode(&answer).map_err(|e| e.to_string())
    }
}

/// Whether more than half of `set` are nodes for which `holds` is true.
fn majority_holds(set: &[u64], holds: impl Fn(u64) -> bool) -> bool {
    set.iter().filter(|&&n| holds(n)).count() > set.len() / 2
}

/// The other members of a tenant's replica set `set` than `me`, and how many of them must hold a
/// write beside `me` as its primary (a majority of the set, `me` counting as one; 0 with R = 1).
pub fn backups(set: &[u64], me: u64) -> (Vec<u64>, usize) {
    let backups = set.iter().copied().filter(|&n| n != me).collect();
    (backups, set.len() / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: during a change of a two-member set growing back to three ([4, 3] after, 2 leaving),
    // the primary and the leaving node alone are no majority of the set after the change, so
    // a write they hold does not count; with the entering node it does. With three members
    // after the change, the primary and one of them are enough.
    #[test]
    fn a_write_during_a_change_counts_once_a_majority_after_it_holds_it() {
        let holding = |nodes: &'static [u64]| move |n: u64| nodes.contains(&n);
        assert!(!majority_holds(&[4, 3], holding(&[4, 2])), "primary and leaving node only");
        assert!(majority_holds(&[4, 3], holding(&[4, 3])));
        assert!(majority_holds(&[4, 3, 1], holding(&[4, 2, 1])));
        assert!(!majority_holds(&[4, 3, 1], holding(&[4, 2])));
    }
}
