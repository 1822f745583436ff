//! A tenant's writes copied from its primary to its backups (docs/REPLICATION.md, "Writes").
//!
//! The primary is the tenant's owner, the first node of its replica set
//! (`RegistryState::replica_set`); the others are its backups. A write is answered only once a
//! majority of the set holds it durably, the primary's own copy counting as one
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
//! it answers where its log ends once the records are durable. An idle tenant has no link
//! entry with work, no timer and no message.
//!
//! Not here yet (docs/REPLICATION.md, order of construction): a primary's lease and the change
//! of primary after a failure; a backup that needs a snapshot is reported, not caught up.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use proto::cluster::{NodeRequest, NodeResponse, ReplicaAck, ReplicaAppend, ReplicaStatus};
use proto::ApiError;
use tokio::sync::{watch, Notify};

use crate::service::Service;
use crate::store::{AppendRefusal, LogPosition, Shipment, Store};

/// How long a write waits for enough backups to hold it before it is answered 503 (its outcome
/// is then unknown, as after a timeout: it may still be committed).
pub const REPLICA_ACK_WAIT: Duration = Duration::from_secs(2);

/// How long one `Replicate` message may take before its backup is treated as unreachable.
const REPLICATE_CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a link waits after a failed message before it sends again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_millis(200);

/// How long an idle link sleeps between looks for work when nothing wakes it.
const IDLE_LOOK: Duration = Duration::from_secs(1);

/// The most record bytes one `Replicate` message carries (16 MiB, a quarter of the message
/// limit); tenants past it wait for the next message.
const REPLICATE_MESSAGE_BYTES_MAX: usize = 16 << 20;

/// How long a backup waits for its registry to reach the epoch a primary sent under.
const EPOCH_CATCH_UP_WAIT: Duration = Duration::from_millis(1000);

/// This node's side of replication as a primary: its links to backups and the ballots its
/// tenants are written under.
pub struct Replication {
    id: u64,
    me: Weak<Replication>,
    store: Arc<Store>,
    peers: Arc<dyn transport::Caller>,
    registry: Arc<raft_registry::Registry>,
    links: Mutex<BTreeMap<u64, Arc<Link>>>,
    /// Bumped after every answer from a backup: writes waiting for acknowledgements look again.
    acks: watch::Sender<u64>,
    /// The ballot each tenant was last led under here, so a write asks the store only when the
    /// placement epoch moved.
    led: Mutex<HashMap<String, u64>>,
}

/// The records of every tenant this node is primary of, to one backup node.
struct Link {
    node: u64,
    state: Mutex<LinkState>,
    wake: Notify,
}

#[derive(Default)]
struct LinkState {
    follows: HashMap<String, Follow>,
    /// Tenants with records to send.
    dirty: BTreeSet<String>,
    /// The last message failed to reach the node.
    unreachable: bool,
}

/// One tenant on one backup, as the primary knows it.
#[derive(Debug, Clone, Copy, Default)]
struct Follow {
    /// Where the backup's log ends, durably, as it last answered; `None` before its first answer.
    durable: Option<u64>,
    /// The last record the backup is to hold: the newest durable record a request waits for.
    want: u64,
    stuck: Option<Stuck>,
}

/// Why records are no longer sent to a backup of a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stuck {
    /// The records it lacks are folded into the primary's phext files.
    NeedsSnapshot,
    /// Its log and the primary's differ at a record both hold.
    Diverged,
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
    ) -> Arc<Replication> {
        Arc::new_cyclic(|me| Replication {
            id,
            me: me.clone(),
            store,
            peers,
            registry,
            links: Mutex::new(BTreeMap::new()),
            acks: watch::channel(0).0,
            led: Mutex::new(HashMap::new()),
        })
    }

    /// The link to `node`, made (with its sending task) on first use.
    fn link(&self, node: u64) -> Arc<Link> {
        let mut links = locked(&self.links);
        if let Some(link) = links.get(&node) {
            return link.clone();
        }
        let link =
            Arc::new(Link { node, state: Mutex::new(LinkState::default()), wake: Notify::new() });
        links.insert(node, link.clone());
        tokio::spawn(send_loop(self.me.clone(), link.clone()));
        link
    }

    /// Makes sure the tenant's records from now on are written under `ballot` (the placement
    /// epoch), so that backups can tell this primary's records from an older one's.
    pub async fn lead(&self, tenant: &str, ballot: u64) -> Result<(), ApiError> {
        if locked(&self.led).get(tenant).is_some_and(|&led| led >= ballot) {
            return Ok(());
        }
        let (store, owned) = (self.store.clone(), tenant.to_string());
        let led = crate::blocking::spawn(move || store.lead(&owned, ballot))
            .await
            .map_err(|e| ApiError::Internal(format!("store task failed: {e}")))?
            .map_err(ApiError::from)?;
        match led {
            Ok(()) => {
                locked(&self.led).insert(tenant.to_string(), ballot);
                Ok(())
            }
            Err(refused) => Err(ApiError::unavailable(format!(
                "this node cannot write the tenant under ballot {ballot}: {refused}"
            ))),
        }
    }

    /// Returns once `needed` of `backups` hold the tenant's records up to `lsn` durably, or
    /// 503 after [`REPLICA_ACK_WAIT`].
    pub async fn commit(
        &self,
        tenant: &str,
        lsn: u64,
        backups: &[u64],
        needed: usize,
    ) -> Result<(), ApiError> {
        if needed == 0 || lsn == 0 {
            return Ok(());
        }
        let mut acks = self.acks.subscribe();
        let links: Vec<Arc<Link>> = backups.iter().map(|&b| self.link(b)).collect();
        for link in &links {
            link.want(tenant, lsn);
        }
        let deadline = tokio::time::Instant::now() + REPLICA_ACK_WAIT;
        loop {
            let held = links.iter().filter(|l| l.durable(tenant) >= Some(lsn)).count();
            if held >= needed {
                return Ok(());
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
                    Some(Stuck::Diverged) => "diverged",
                    None if unreachable => "unreachable",
                    None if durable_lsn >= Some(last_lsn) => "in-sync",
                    None if follow.is_none() && last_lsn == 0 => "in-sync",
                    None => "behind",
                };
                ReplicaStatus { node, durable_lsn, state: state.to_string() }
            })
            .collect()
    }

    /// Sends one message of `link`'s pending records; false when it failed (the caller waits
    /// before the next).
    async fn ship(&self, link: &Link, work: Vec<(String, u64, u64)>) -> bool {
        let store = self.store.clone();
        let shipments = crate::blocking::spawn(move || {
            work.into_iter()
                .map(|(tenant, after, upto)| {
                    let shipment = store.shipment(&tenant, after, upto);
                    (tenant, after, shipment)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let epoch = self.registry.state().placement_epoch();
        let (mut appends, mut sent, mut bytes) = (Vec::new(), Vec::new(), 0usize);
        for (tenant, after, shipment) in shipments {
            match shipment {
                Ok(Shipment::Records { prev, ballot, bytes: records, last_lsn })
                    if bytes == 0 || bytes + records.len() <= REPLICATE_MESSAGE_BYTES_MAX =>
                {
                    bytes += records.len();
                    sent.push((tenant.clone(), after, last_lsn));
                    appends.push(ReplicaAppend {
                        tenant,
                        epoch,
                        ballot,
                        prev_ballot: prev.ballot,
                        prev_lsn: prev.lsn,
                        records,
                    });
                }
                // Over this message's budget: the next one.
                Ok(Shipment::Records { .. }) => link.mark_dirty(&tenant),
                Ok(Shipment::Nothing) => {}
                Ok(Shipment::Checkpointed) => {
                    tracing::warn!(tenant = %tenant, backup = link.node, "the records a backup lacks are checkpointed; it needs a snapshot");
                    link.stick(&tenant, Stuck::NeedsSnapshot);
                }
                Err(e) => {
                    tracing::warn!(tenant = %tenant, backup = link.node, error = %e, "reading records for a backup failed");
                    link.mark_dirty(&tenant);
                }
            }
        }
        if appends.is_empty() {
            return true;
        }
        crate::metrics::replication_bytes(bytes as u64);
        let answer = self.call(link.node, NodeRequest::Replicate { from: self.id, appends }).await;
        let acks = match answer {
            Ok(NodeResponse::Replicated(acks)) if acks.len() == sent.len() => acks,
            other => {
                let why = match other {
                    Ok(NodeResponse::Refused(why)) => why,
                    Ok(_) => "an answer of another kind".to_string(),
                    Err(e) => e,
                };
                tracing::debug!(backup = link.node, error = %why, "replicate message failed");
                let mut st = locked(&link.state);
                st.unreachable = true;
                st.dirty.extend(sent.into_iter().map(|(t, _, _)| t));
                return false;
            }
        };
        let mut refused = false;
        for ((tenant, after, _), ack) in sent.into_iter().zip(acks) {
            match ack {
                ReplicaAck::Durable { lsn, .. } => link.heard(&tenant, lsn),
                ReplicaAck::NotContinuing { lsn, .. } if lsn == after => {
                    // Same record number, another ballot: the logs differ there.
                    tracing::warn!(tenant = %tenant, backup = link.node, lsn, "a backup's log differs from the primary's");
                    link.stick(&tenant, Stuck::Diverged);
                }
                ReplicaAck::NotContinuing { lsn, .. } => link.heard(&tenant, lsn),
                ReplicaAck::Refused(why) => {
                    tracing::debug!(tenant = %tenant, backup = link.node, reason = %why, "a backup refused records");
                    refused = true;
                    link.mark_dirty(&tenant);
                }
            }
            self.trim(&tenant);
        }
        locked(&link.state).unreachable = false;
        !refused
    }

    /// Drops the records kept for backups that every link following the tenant holds.
    fn trim(&self, tenant: &str) {
        let links: Vec<Arc<Link>> = locked(&self.links).values().cloned().collect();
        let lowest = links.iter().filter_map(|l| l.durable_if_followed(tenant)).min();
        if let Some(Some(lsn)) = lowest {
            self.store.trim_tail(tenant, lsn);
        }
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

impl Link {
    fn want(&self, tenant: &str, lsn: u64) {
        let mut st = locked(&self.state);
        let follow = st.follows.entry(tenant.to_string()).or_default();
        if follow.want >= lsn && follow.durable >= Some(lsn) {
            return;
        }
        follow.want = follow.want.max(lsn);
        st.dirty.insert(tenant.to_string());
        drop(st);
        self.wake.notify_one();
    }

    fn durable(&self, tenant: &str) -> Option<u64> {
        locked(&self.state).follows.get(tenant).and_then(|f| f.durable)
    }

    /// `Some(durable)` when this link follows the tenant (`durable` `None` if not yet heard).
    fn durable_if_followed(&self, tenant: &str) -> Option<Option<u64>> {
        locked(&self.state).follows.get(tenant).map(|f| f.durable)
    }

    fn mark_dirty(&self, tenant: &str) {
        locked(&self.state).dirty.insert(tenant.to_string());
    }

    fn stick(&self, tenant: &str, why: Stuck) {
        if let Some(f) = locked(&self.state).follows.get_mut(tenant) {
            f.stuck = Some(why);
        }
    }

    /// The backup's log ends at `lsn`, durably: sends on from there if it lacks what it is to
    /// hold.
    fn heard(&self, tenant: &str, lsn: u64) {
        let mut st = locked(&self.state);
        let Some(f) = st.follows.get_mut(tenant) else { return };
        f.durable = Some(lsn);
        if lsn > f.want {
            // Ahead of every record this primary asked for: it holds records this primary's
            // log does not (or not yet durably); it is not sent to until that is resolved.
            f.stuck = Some(Stuck::Diverged);
        } else if lsn < f.want {
            st.dirty.insert(tenant.to_string());
        }
    }

    /// The tenants with records to send: (tenant, the backup's log end, the last record to send).
    fn take_work(&self) -> Vec<(String, u64, u64)> {
        let mut st = locked(&self.state);
        let dirty = std::mem::take(&mut st.dirty);
        dirty
            .into_iter()
            .filter_map(|tenant| {
                let f = st.follows.get(&tenant)?;
                if f.stuck.is_some() {
                    return None;
                }
                // Before its first answer, the backup is taken to hold everything before the
                // record asked for; if it does not, it answers where its log ends.
                let after = f.durable.unwrap_or(f.want.saturating_sub(1));
                (after < f.want).then_some((tenant, after, f.want))
            })
            .collect()
    }
}

/// A link's task: sends its pending records, one message at a time, until the node's
/// replication is dropped.
async fn send_loop(replication: Weak<Replication>, link: Arc<Link>) {
    loop {
        let work = link.take_work();
        if work.is_empty() {
            // A permit left by a `want` while the link was busy wakes this at once.
            let _ = tokio::time::timeout(IDLE_LOOK, link.wake.notified()).await;
            if replication.strong_count() == 0 {
                return;
            }
            continue;
        }
        let Some(r) = replication.upgrade() else { return };
        let ok = r.ship(&link, work).await;
        r.acks.send_modify(|n| *n += 1);
        drop(r);
        if !ok {
            tokio::time::sleep(RETRY_AFTER_FAILURE).await;
        }
    }
}

/// A backup takes a primary's records: each append is checked against this node's registry
/// (the sender is the tenant's primary, this node one of its backups) and the store (ballot,
/// continuity), then made durable.
pub async fn take(svc: &Service, from: u64, appends: Vec<ReplicaAppend>) -> Vec<ReplicaAck> {
    let epoch = appends.iter().map(|a| a.epoch).max().unwrap_or(0);
    svc.wait_for_epoch(epoch, EPOCH_CATCH_UP_WAIT).await;
    let state = svc.registry.state();
    let taken = appends.into_iter().map(|a| {
        let set = state.replica_set(&a.tenant);
        let refusal = if state.tenant(&a.tenant).is_none() {
            Some(format!("no tenant {:?} in this node's registry", a.tenant))
        } else if set.first() != Some(&from) || !set.contains(&svc.id) {
            Some(format!(
                "at placement epoch {}, node {from} is not the primary of {:?} with node {} \
                 its backup (the set is {set:?})",
                state.placement_epoch(),
                a.tenant,
                svc.id
            ))
        } else {
            None
        };
        let store = svc.store.clone();
        async move {
            if let Some(why) = refusal {
                return ReplicaAck::Refused(why);
            }
            let prev = LogPosition { ballot: a.prev_ballot, lsn: a.prev_lsn };
            let appended = crate::blocking::spawn(move || {
                store.append_from_primary(&a.tenant, a.ballot, prev, &a.records)
            })
            .await;
            match appended {
                Ok(Ok(Ok(end))) => ReplicaAck::Durable { ballot: end.ballot, lsn: end.lsn },
                Ok(Ok(Err(AppendRefusal::NotContinuing { have }))) => {
                    ReplicaAck::NotContinuing { ballot: have.ballot, lsn: have.lsn }
                }
                Ok(Ok(Err(AppendRefusal::Ballot(refused)))) => {
                    ReplicaAck::Refused(refused.to_string())
                }
                Ok(Err(e)) => ReplicaAck::Refused(format!("store: {e}")),
                Err(e) => ReplicaAck::Refused(format!("store task failed: {e}")),
            }
        }
    });
    futures::future::join_all(taken).await
}
