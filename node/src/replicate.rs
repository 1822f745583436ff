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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use proto::cluster::{
    FetchedRecords, NodeRequest, NodeResponse, ReplicaAck, ReplicaAppend, ReplicaReport,
    ReplicaStatus,
};
use proto::ApiError;
use tokio::sync::{watch, Notify};

use crate::service::Service;
use crate::store::{AppendRefusal, LogPosition, Shared, Shipment, Store};

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
    /// The backup is to cut its log after this record before it takes more, as long as its log
    /// still ends where it said (the second): it holds records past the first that this
    /// primary's log does not.
    truncate: Option<(u64, u64)>,
    stuck: Option<Stuck>,
    /// The backup's copy does not count yet (its node lost its disk): its acknowledgements are
    /// not counted toward a majority.
    learner: bool,
    /// The learner holds what this node held when it prepared: tell it it counts.
    promote: bool,
}

/// What a link sends a backup next for one tenant.
struct Work {
    tenant: String,
    /// Where the backup's log ends (after any cut).
    after: u64,
    /// The last record to send.
    upto: u64,
    truncate: Option<(u64, u64)>,
    /// The backup's end is not known (a new link, or a new ballot): ask whether its log ends at
    /// `upto` with an append of no records, which it answers with where its log ends.
    probe: bool,
    /// Tell the backup, a learner, that its copy counts from now on.
    caught_up: bool,
}

/// Why records are no longer sent to a backup of a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stuck {
    /// The records it lacks are folded into the primary's phext files, or the records it must
    /// cut into its own.
    NeedsSnapshot,
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
        let (backups, needed) = backups(&state, tenant, self.id);
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

    /// Before this node serves the tenant as its primary under `ballot` (the placement epoch),
    /// once per ballot (docs/REPLICATION.md, "A change of primary"): promises `ballot` itself
    /// and gathers the promises of `needed` of the other members (`others`), which from then on
    /// refuse every older primary; adopts the most advanced log among them (ballot of the last
    /// record, then lsn; never a commit point), cutting any records of its own that log does not
    /// hold and fetching the records it lacks; then writes under `ballot`. A write acknowledged
    /// under an earlier ballot is on a majority of the set, so on one of the promises.
    ///
    /// Returns the ballot this node leads the tenant under (`ballot` or a later one), which the
    /// request's [`Self::commit`] names.
    pub async fn prepare(
        &self,
        tenant: &str,
        ballot: u64,
        others: &[u64],
        needed: usize,
    ) -> Result<u64, ApiError> {
        self.used(tenant);
        let led = |me: &Self| locked(&me.led).get(tenant).copied().filter(|&led| led >= ballot);
        if let Some(led) = led(self) {
            return Ok(led);
        }
        let gate = locked(&self.preparing).entry(tenant.to_string()).or_default().clone();
        let _one_at_a_time = gate.lock().await;
        if let Some(led) = led(self) {
            return Ok(led);
        }
        // A node that lost its disk may have led under this ballot before, with records it no
        // longer has and another replica may hold: leading under it again could give one
        // (ballot, lsn) two records (simulator seed 4043 of `--replicas 3`).
        if let Some(lost_at) = self.store.lost_at_epoch().filter(|&lost_at| ballot <= lost_at) {
            return Err(ApiError::unavailable(format!(
                "this node lost its copies at placement epoch {lost_at} and leads no tenant \
                 again until the epoch moves past it (it is at {ballot})"
            )));
        }
        for link in locked(&self.links).values() {
            link.forget(tenant);
        }
        // A copy being rebuilt after a lost disk does not count: another member promises in
        // its place.
        let (store, owned) = (self.store.clone(), tenant.to_string());
        let counts = blocking(move || store.counts(&owned)).await?;
        let needed = if counts { needed } else { needed + 1 };
        if others.len() < needed {
            return Err(ApiError::unavailable(format!(
                "this node's copy of the tenant is being rebuilt and the tenant has {} other \
                 replicas, too few to lead it",
                others.len()
            )));
        }
        let (store, owned) = (self.store.clone(), tenant.to_string());
        let mine = blocking(move || match store.promise(&owned, ballot)? {
            Ok(_) => store.durable_state(&owned).map(Ok),
            Err(refused) => Ok(Err(refused)),
        })
        .await?
        .map_err(|refused| {
            ApiError::unavailable(format!("this node cannot lead the tenant: {refused}"))
        })?;
        let mut asks: FuturesUnordered<_> = others
            .iter()
            .map(|&node| async move {
                let request = NodeRequest::Prepare { tenant: tenant.to_string(), ballot };
                match self.call(node, request).await {
                    Ok(NodeResponse::Promised(Ok(report))) => {
                        let ballots = crate::store::Ballots::from_wire(&report.ballots).ok()?;
                        Some((node, ballots, report.last_lsn))
                    }
                    Ok(NodeResponse::Promised(Err(why))) => {
                        tracing::info!(tenant, node, reason = %why, "a member did not promise");
                        None
                    }
                    _ => None,
                }
            })
            .collect();
        let mut promised = Vec::new();
        while promised.len() < needed {
            match asks.next().await {
                Some(Some(promise)) => promised.push(promise),
                Some(None) => {}
                None => break,
            }
        }
        drop(asks);
        if promised.len() < needed {
            return Err(ApiError::unavailable(format!(
                "{} of the tenant's other {} replicas promised its new primary and {needed} must",
                promised.len(),
                others.len()
            )));
        }
        tracing::debug!(
            node = self.id,
            tenant,
            ballot,
            mine = ?mine.ballots.position(mine.last_lsn),
            mine_history = ?mine.ballots,
            promised = ?promised.iter().map(|(n, b, l)| (*n, b.position(*l))).collect::<Vec<_>>(),
            "prepare: promises gathered"
        );
        let best = promised.into_iter().max_by_key(|(_, b, last)| b.position(*last));
        if let Some((from, theirs, their_end)) = best {
            if theirs.position(their_end) > mine.ballots.position(mine.last_lsn) {
                self.adopt(tenant, ballot, &mine, from, &theirs, their_end).await?;
            }
        }
        let (store, owned) = (self.store.clone(), tenant.to_string());
        let end = blocking(move || {
            if let Err(refused) = store.lead(&owned, ballot)? {
                return Ok(Err(refused));
            }
            // Records of earlier ballots are shown only once a record of this one is on a
            // majority: a read waits for the barrier too (Raft's no-op of a new term).
            store.barrier(&owned, ballot)?;
            // It holds the most advanced log of a majority that counts: its copy counts too.
            store.mark_caught_up(&owned)?;
            Ok(Ok(store.replica_state(&owned)?.last_lsn))
        })
        .await?
        .map_err(|refused| {
            ApiError::unavailable(format!("this node cannot lead the tenant: {refused}"))
        })?;
        locked(&self.prepared_end).insert(tenant.to_string(), end);
        locked(&self.led).insert(tenant.to_string(), ballot);
        // Every member is brought to this log's end (its barrier, and what it adopted), in the
        // background: a tenant that takes no write after a failover still ends up on all its
        // replicas, and only then goes quiet.
        for &node in others {
            self.link(node).want(tenant, end);
        }
        crate::metrics::prepared();
        Ok(ballot)
    }

    /// Makes this node's log of the tenant that of member `from` (ending at `their_end`): cuts
    /// what it holds past the last record they share, then fetches the rest from `from`. When
    /// the logs differ below what either still holds as records (a checkpoint folded them), it
    /// takes `from`'s snapshot instead (`crate::catchup`), once.
    async fn adopt(
        &self,
        tenant: &str,
        ballot: u64,
        mine: &crate::store::ReplicaState,
        from: u64,
        theirs: &crate::store::Ballots,
        their_end: u64,
    ) -> Result<(), ApiError> {
        let mut snapshot_taken = false;
        let mut snapshot = || {
            let first = !std::mem::replace(&mut snapshot_taken, true);
            async move {
                if !first {
                    return Err(ApiError::unavailable(format!(
                        "node {from}'s log still differs from this node's after a snapshot"
                    )));
                }
                let taken = crate::catchup::take(
                    &self.copier(),
                    &self.registry,
                    self.id,
                    tenant,
                    from,
                    ballot,
                )
                .await;
                taken.map_err(|e| {
                    ApiError::unavailable(format!("taking node {from}'s snapshot: {e}"))
                })
            }
        };
        let mut end =
            match crate::store::common_prefix(&mine.ballots, mine.last_lsn, theirs, their_end) {
                Shared::Through(shared) if mine.last_lsn <= shared => shared,
                Shared::Through(shared) => {
                    let (store, owned) = (self.store.clone(), tenant.to_string());
                    if blocking(move || store.truncate_after(&owned, shared)).await? {
                        tracing::warn!(
                            tenant,
                            cut_after = shared,
                            dropped = mine.last_lsn - shared,
                            "a new primary cut records no majority held"
                        );
                        shared
                    } else {
                        snapshot().await?
                    }
                }
                Shared::Unknown => snapshot().await?,
            };
        while end < their_end {
            let request =
                NodeRequest::FetchRecords { tenant: tenant.to_string(), ballot, after: end };
            let fetched = match self.call(from, request).await {
                Ok(NodeResponse::Fetched(fetched)) => fetched,
                Ok(_) => {
                    return Err(ApiError::unavailable(format!(
                        "node {from} answered a fetch oddly"
                    )))
                }
                Err(e) => {
                    return Err(ApiError::unavailable(format!("fetching from node {from}: {e}")))
                }
            };
            let (written, prev, records) = match fetched {
                FetchedRecords::Records {
                    ballot: written, prev_ballot, prev_lsn, records, ..
                } => (written, LogPosition { ballot: prev_ballot, lsn: prev_lsn }, records),
                FetchedRecords::Checkpointed => {
                    end = snapshot().await?;
                    continue;
                }
                other => {
                    return Err(ApiError::unavailable(format!(
                        "node {from} sent no records: {other:?}"
                    )))
                }
            };
            let (store, owned) = (self.store.clone(), tenant.to_string());
            let taken = blocking(move || {
                store.append_from_primary(&owned, ballot, written, prev, &records)
            })
            .await?
            .map_err(|refused| {
                ApiError::unavailable(format!("records from node {from} refused: {refused}"))
            })?;
            end = taken.lsn;
        }
        Ok(())
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
        if needed == 0 || lsn == 0 {
            return Ok(());
        }
        self.used(tenant);
        let still_led = |me: &Self| {
            if locked(&me.led).get(tenant) == Some(&ballot) {
                Ok(())
            } else {
                Err(ApiError::unavailable(format!(
                    "the tenant's primary prepared again while the request waited (it led \
                     under ballot {ballot}); its outcome is unknown"
                )))
            }
        };
        still_led(self)?;
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

    /// Sends one message of `link`'s pending records; false when it failed (the caller waits
    /// before the next).
    async fn ship(&self, link: &Link, work: Vec<Work>) -> bool {
        let state = self.registry.state();
        // Records go out under the ballot this node prepared the tenant at, never a later epoch
        // it has not prepared: a backup that promised a newer primary refuses them, so a node
        // back from a pause can neither overwrite nor cut what a newer primary wrote.
        let mut ballots = HashMap::new();
        let mut keep = Vec::new();
        for w in work {
            let led = locked(&self.led).get(&w.tenant).copied();
            let member = state.tenant(&w.tenant).is_some()
                && state.replica_set(&w.tenant).contains(&link.node);
            match led {
                Some(led) if state.primary_of(&w.tenant) == Some(self.id) && member => {
                    ballots.insert(w.tenant.clone(), led);
                    keep.push(w);
                }
                // A tenant this node no longer leads, or has not prepared since it started, is
                // sent nothing more; nor is a node that left the tenant's set (a join or drain),
                // nor a tenant purged. One it led and another node leads now is handed over.
                Some(led)
                    if state.tenant(&w.tenant).is_some()
                        && state.primary_of(&w.tenant) != Some(self.id) =>
                {
                    link.forget(&w.tenant);
                    self.hand_over(&w.tenant, led);
                }
                _ => link.forget(&w.tenant),
            }
        }
        // Records still kept in memory go without a hop to the blocking pool; the rest, and
        // probes, are read there.
        let mut shipments = Vec::with_capacity(keep.len());
        let mut slow = Vec::new();
        for w in keep {
            match (!w.probe).then(|| self.store.shipment_in_memory(&w.tenant, w.after, w.upto)) {
                Some(Some(shipment)) => shipments.push((w, Ok(shipment))),
                _ => slow.push(w),
            }
        }
        let store = self.store.clone();
        let read = if slow.is_empty() {
            Vec::new()
        } else {
            crate::blocking::spawn(move || {
                slow.into_iter()
                    .map(|w| {
                        let shipment = if w.probe {
                            // At the backup's end after the cut, if one is asked, else at `upto`.
                            let at = if w.truncate.is_some() { w.after } else { w.upto };
                            store.replica_state(&w.tenant).map(|r| match r.ballots.ballot_of(at) {
                                Some(ballot) => Shipment::Records {
                                    prev: LogPosition { ballot, lsn: at },
                                    ballot,
                                    bytes: Vec::new(),
                                    last_lsn: at,
                                },
                                None => Shipment::Checkpointed,
                            })
                        } else {
                            store.shipment(&w.tenant, w.after, w.upto)
                        };
                        (w, shipment)
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default()
        };
        shipments.extend(read);
        let (mut appends, mut sent, mut bytes) = (Vec::new(), Vec::new(), 0usize);
        for (w, shipment) in shipments {
            let tenant = w.tenant;
            let epoch = ballots.get(&tenant).copied().unwrap_or(0);
            match shipment {
                Ok(Shipment::Records { prev, ballot, bytes: records, last_lsn })
                    if bytes == 0 || bytes + records.len() <= REPLICATE_MESSAGE_BYTES_MAX =>
                {
                    bytes += records.len();
                    sent.push((tenant.clone(), last_lsn));
                    appends.push(ReplicaAppend {
                        tenant,
                        epoch,
                        ballot,
                        prev_ballot: prev.ballot,
                        prev_lsn: prev.lsn,
                        truncate_after: w.truncate.map(|(cut, _)| cut),
                        truncate_if_end: w.truncate.map_or(0, |(_, end)| end),
                        records,
                        caught_up: w.caught_up && epoch == state.placement_epoch(),
                    });
                }
                // Over this message's budget: the next one.
                Ok(Shipment::Records { .. }) => link.mark_dirty(&tenant),
                Ok(Shipment::Nothing) => {}
                Ok(Shipment::Checkpointed) => {
                    tracing::warn!(tenant = %tenant, backup = link.node, "the records a backup lacks are checkpointed; it needs a snapshot");
                    self.needs_snapshot(link, &tenant);
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
                st.dirty.extend(sent.into_iter().map(|(t, _)| t));
                return false;
            }
        };
        let mut refused = false;
        let epoch_now = self.registry.state().placement_epoch();
        for ((tenant, _), ack) in sent.into_iter().zip(acks) {
            match ack {
                ReplicaAck::Durable { lsn, learner, .. } => {
                    // A learner is told it counts only by a primary that prepared at the
                    // current placement epoch: one that led since an earlier one may lack
                    // writes a newer primary had acknowledged with the learner's lost copy,
                    // which no promise of the wiped learner fences any more. It prepares anew
                    // at its next request.
                    let current = ballots.get(&tenant) == Some(&epoch_now);
                    let prepared_end = locked(&self.prepared_end).get(&tenant).copied();
                    link.heard(&tenant, lsn, learner, prepared_end.filter(|_| current))
                }
                ReplicaAck::NotContinuing { lsn, ballots, .. } => {
                    self.realign(link, &tenant, lsn, &ballots).await;
                }
                ReplicaAck::NeedsSnapshot => {
                    tracing::warn!(tenant = %tenant, backup = link.node, "a backup must cut records it already checkpointed; it needs a snapshot");
                    self.needs_snapshot(link, &tenant);
                }
                ReplicaAck::Refused(why) => {
                    tracing::debug!(tenant = %tenant, backup = link.node, reason = %why, "a backup refused records");
                    if ballots.get(&tenant).is_some_and(|&led| led < epoch_now) {
                        // Led under a ballot the registry has moved past: the backup may have
                        // promised a newer one, and refuses for good. Nothing more is sent
                        // until this node prepares the tenant again (at its next request).
                        link.forget(&tenant);
                        if let Some(&led) = ballots.get(&tenant) {
                            self.hand_over(&tenant, led);
                        }
                    } else {
                        refused = true;
                        link.mark_dirty(&tenant);
                    }
                }
            }
            self.trim(&tenant);
        }
        locked(&link.state).unreachable = false;
        !refused
    }

    /// A backup's log ends at `their_end` and does not continue where this primary sent from:
    /// from the two ballot histories, finds the last record both logs share (KIP-101), and sends
    /// from there, asking the backup to cut what lies past it.
    async fn realign(&self, link: &Link, tenant: &str, their_end: u64, ballots: &[u8]) {
        let theirs = match crate::store::Ballots::from_wire(ballots) {
            Ok(theirs) => theirs,
            Err(why) => {
                tracing::warn!(tenant = %tenant, backup = link.node, error = %why, "a backup sent unreadable ballots");
                link.mark_dirty(tenant);
                return;
            }
        };
        let (store, owned) = (self.store.clone(), tenant.to_string());
        let mine = crate::blocking::spawn(move || store.replica_state(&owned)).await;
        let Ok(Ok(mine)) = mine else {
            link.mark_dirty(tenant);
            return;
        };
        match crate::store::common_prefix(&mine.ballots, mine.last_lsn, &theirs, their_end) {
            Shared::Through(shared) => {
                link.realigned(tenant, shared, (their_end > shared).then_some(their_end))
            }
            Shared::Unknown => {
                tracing::warn!(tenant = %tenant, backup = link.node, "a backup's log differs below what the primary still describes; it needs a snapshot");
                self.needs_snapshot(link, tenant);
            }
        }
    }

    /// A backup of the tenant cannot be sent records (its log no longer meets this one): no
    /// more are sent, and it is asked to take a snapshot from this node (`crate::catchup`).
    /// After [`crate::catchup::CATCH_UP_LOOK`] it is asked again where its log ends; if it still
    /// needs a snapshot, it is asked again (a backup runs one catch-up per tenant at a time).
    fn needs_snapshot(&self, link: &Link, tenant: &str) {
        link.stick(tenant, Stuck::NeedsSnapshot);
        let (Some(me), Some(led)) = (self.me.upgrade(), locked(&self.led).get(tenant).copied())
        else {
            return;
        };
        let (node, tenant) = (link.node, tenant.to_string());
        tokio::spawn(async move {
            let request = NodeRequest::CatchUp { from: me.id, tenant: tenant.clone(), epoch: led };
            match me.call(node, request).await {
                Ok(NodeResponse::CatchingUp(Ok(()))) => {}
                Ok(NodeResponse::CatchingUp(Err(why))) => {
                    tracing::debug!(tenant, backup = node, reason = %why, "a backup refused to catch up")
                }
                other => {
                    tracing::debug!(tenant, backup = node, answer = ?other, "asking a backup to catch up failed")
                }
            }
            tokio::time::sleep(crate::catchup::CATCH_UP_LOOK).await;
            let link = locked(&me.links).get(&node).cloned();
            if let Some(link) = link {
                link.unstick(&tenant);
            }
        });
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
        // A read asks for what the backup already holds: no name allocated, nothing to do.
        if !st.follows.contains_key(tenant) {
            st.follows.insert(tenant.to_string(), Follow::default());
        }
        let Some(follow) = st.follows.get_mut(tenant) else { return };
        if follow.want >= lsn && follow.durable >= Some(lsn) {
            return;
        }
        follow.want = follow.want.max(lsn);
        st.dirty.insert(tenant.to_string());
        drop(st);
        self.wake.notify_one();
    }

    /// Whether the backup holds everything it was sent of the tenant, with nothing to cut or
    /// promote (or the link does not follow the tenant at all).
    fn settled(&self, tenant: &str) -> bool {
        let st = locked(&self.state);
        let Some(f) = st.follows.get(tenant) else { return true };
        !st.dirty.contains(tenant)
            && f.durable >= Some(f.want)
            && f.truncate.is_none()
            && f.stuck.is_none()
            && !f.promote
    }

    /// Where the backup's log ends, durably, if its copy counts (it is no learner).
    fn member_durable(&self, tenant: &str) -> Option<u64> {
        locked(&self.state).follows.get(tenant).filter(|f| !f.learner).and_then(|f| f.durable)
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

    /// Asks the backup where its log ends again, if records no longer went to it.
    fn unstick(&self, tenant: &str) {
        let mut st = locked(&self.state);
        let Some(f) = st.follows.get_mut(tenant) else { return };
        if f.stuck.take().is_none() {
            return;
        }
        (f.durable, f.truncate) = (None, None);
        st.dirty.insert(tenant.to_string());
        drop(st);
        self.wake.notify_one();
    }

    /// The backup's log ends at `lsn`, durably, continuing this primary's: sends on from there
    /// if it lacks what it is to hold. A `learner` holding `prepared_end` is told it counts.
    fn heard(&self, tenant: &str, lsn: u64, learner: bool, prepared_end: Option<u64>) {
        let mut st = locked(&self.state);
        let Some(f) = st.follows.get_mut(tenant) else { return };
        f.durable = Some(lsn);
        f.learner = learner;
        f.promote = learner && prepared_end.is_some_and(|end| lsn >= end);
        if lsn < f.want || f.promote {
            st.dirty.insert(tenant.to_string());
        }
    }

    /// The backup shares this primary's log through `shared`; with `ends_at`, its log runs on
    /// to there with records it must drop first.
    fn realigned(&self, tenant: &str, shared: u64, ends_at: Option<u64>) {
        let mut st = locked(&self.state);
        let Some(f) = st.follows.get_mut(tenant) else { return };
        f.durable = Some(shared);
        // Counted again once it acknowledges records as a member.
        f.learner = true;
        f.truncate = ends_at.map(|end| (shared, end));
        st.dirty.insert(tenant.to_string());
    }

    /// Stops following the tenant (this node no longer leads it, or leads it anew).
    fn forget(&self, tenant: &str) {
        let mut st = locked(&self.state);
        st.follows.remove(tenant);
        st.dirty.remove(tenant);
    }

    /// The tenants with records to send.
    fn take_work(&self) -> Vec<Work> {
        let mut st = locked(&self.state);
        let dirty = std::mem::take(&mut st.dirty);
        dirty
            .into_iter()
            .filter_map(|tenant| {
                let f = st.follows.get_mut(&tenant)?;
                if f.stuck.is_some() {
                    return None;
                }
                // Before its first answer, the backup is asked whether it holds everything up to
                // the record asked for; if not, it answers where its log ends. A cut with
                // nothing to send after it goes as such an empty append too.
                let after = f.durable.unwrap_or(f.want);
                let truncate = f.truncate.take();
                let caught_up = std::mem::take(&mut f.promote);
                if caught_up && truncate.is_none() && after >= f.want {
                    // Nothing to send: an empty append at its end says it counts.
                    return Some(Work {
                        tenant,
                        after,
                        upto: after,
                        truncate,
                        probe: true,
                        caught_up,
                    });
                }
                // So does a follow counted as a learner's with nothing to send (after a realign,
                // whose answer did not say whether the copy counts): its answer says.
                let probe = f.durable.is_none()
                    || (truncate.is_some() && after >= f.want)
                    || (f.learner && after >= f.want);
                (after < f.want || truncate.is_some() || probe).then_some(Work {
                    tenant,
                    after,
                    upto: f.want.max(after),
                    truncate,
                    probe,
                    caught_up: caught_up && !probe,
                })
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

/// Whether more than half of `set` are nodes for which `holds` is true.
fn majority_holds(set: &[u64], holds: impl Fn(u64) -> bool) -> bool {
    set.iter().filter(|&&n| holds(n)).count() > set.len() / 2
}

/// The other members of the tenant's replica set than `me`, and how many of them must hold a
/// write beside `me` as its primary (a majority of the set, `me` counting as one; 0 with R = 1).
pub fn backups(state: &raft_registry::RegistryState, tenant: &str, me: u64) -> (Vec<u64>, usize) {
    let set = state.replica_set(tenant);
    let backups = set.iter().copied().filter(|&n| n != me).collect();
    (backups, set.len() / 2)
}

/// Why a member refuses a request about a tenant from `from` under `ballot`: unless `from` is
/// the tenant's primary and this node a member of its set in this node's registry, once that
/// has reached `ballot` (waited for briefly).
pub(crate) async fn refusal(svc: &Service, from: u64, tenant: &str, ballot: u64) -> Option<String> {
    svc.wait_for_epoch(ballot, EPOCH_CATCH_UP_WAIT).await;
    let state = svc.registry.state();
    let set = state.replica_set(tenant);
    if state.tenant(tenant).is_none() {
        Some(format!("no tenant {tenant:?} in this node's registry"))
    } else if state.primary_of(tenant) != Some(from) || !set.contains(&svc.id) {
        // From a node that led the tenant before this one: see that this one has prepared.
        svc.replication.prepare_soon(tenant);
        Some(format!(
            "at placement epoch {}, node {from} is not the primary of {tenant:?} with node {} in \
             its set {set:?}",
            state.placement_epoch(),
            svc.id
        ))
    } else {
        None
    }
}

/// A backup takes a primary's records: each append is checked against this node's registry
/// (the sender is the tenant's primary, this node one of its set) and the store (ballot,
/// continuity), cut first where the primary says so, then made durable.
pub async fn take(svc: &Service, from: u64, appends: Vec<ReplicaAppend>) -> Vec<ReplicaAck> {
    let taken = appends.into_iter().map(|mut a| async move {
        if let Some(why) = refusal(svc, from, &a.tenant, a.epoch).await {
            return ReplicaAck::Refused(why);
        }
        // A copy rebuilt after a lost disk promised nothing that survived: only the placement
        // epoch fences an older primary now. It counts only on the word of a primary that
        // prepared at the epoch this node's registry is at; one whose registry lags (it led
        // under an older epoch and was never told otherwise) may lack writes a newer primary
        // had acknowledged with this copy's lost promise.
        a.caught_up &= a.epoch == svc.registry.state().placement_epoch();
        let store = svc.store.clone();
        crate::blocking::spawn(move || take_one(&store, a))
            .await
            .unwrap_or_else(|e| ReplicaAck::Refused(format!("store task failed: {e}")))
    });
    futures::future::join_all(taken).await
}

fn take_one(store: &Store, a: ReplicaAppend) -> ReplicaAck {
    let t = a.tenant.as_str();
    if let Some(cut) = a.truncate_after {
        // Only a primary this replica may follow cuts its log, and only the log it was told of:
        // a late copy of the message finds another end, cuts nothing, and is refused below as
        // not continuing.
        match store.promise(t, a.epoch) {
            Ok(Ok(state)) if state.last_lsn == a.truncate_if_end => {}
            Ok(Ok(_)) => {
                return ReplicaAck::Refused("the log no longer ends where the cut was asked".into())
            }
            Ok(Err(refused)) => return ReplicaAck::Refused(refused.to_string()),
            Err(e) => return ReplicaAck::Refused(format!("store: {e}")),
        }
        match store.truncate_after(t, cut) {
            Ok(true) => {}
            Ok(false) => return ReplicaAck::NeedsSnapshot,
            Err(e) => return ReplicaAck::Refused(format!("store: {e}")),
        }
    }
    let prev = LogPosition { ballot: a.prev_ballot, lsn: a.prev_lsn };
    match store.append_from_primary(t, a.epoch, a.ballot, prev, &a.records) {
        Ok(Ok(end)) => {
            // Its primary found it holding what it held when it prepared.
            let counted = match a.caught_up {
                true => store.mark_caught_up(t).and_then(|()| store.counts(t)),
                false => store.counts(t),
            };
            match counted {
                Ok(counts) => {
                    ReplicaAck::Durable { ballot: end.ballot, lsn: end.lsn, learner: !counts }
                }
                Err(e) => ReplicaAck::Refused(format!("store: {e}")),
            }
        }
        Ok(Err(AppendRefusal::NotContinuing { have })) => match store.replica_state(t) {
            Ok(state) => ReplicaAck::NotContinuing {
                ballot: have.ballot,
                lsn: have.lsn,
                ballots: state.ballots.to_wire(),
            },
            Err(e) => ReplicaAck::Refused(format!("store: {e}")),
        },
        Ok(Err(AppendRefusal::Ballot(refused))) => ReplicaAck::Refused(refused.to_string()),
        Err(e) => ReplicaAck::Refused(format!("store: {e}")),
    }
}

/// Primary: node `from` enters the tenant's replica set in the change recorded at `epoch`
/// (docs/REPLICATION.md, "Joins and drains"). Prepares the tenant if it has not (a prepare
/// with the set of the change, both the entering and the leaving node in it), brings `from`'s
/// copy up (records, or a snapshot as for any backup), and answers whether the change may be
/// committed ([`Replication::entered`]).
pub async fn entering(svc: &Service, from: u64, tenant: String, epoch: u64) -> NodeResponse {
    svc.wait_for_epoch(epoch, EPOCH_CATCH_UP_WAIT).await;
    let state = svc.registry.state();
    match state.replica_change(&tenant) {
        Some(h) if h.to == from && h.epoch == epoch => {}
        _ => {
            return NodeResponse::Entered(Err(format!(
                "no change of {tenant:?}'s replica set brings node {from} in at epoch {epoch}"
            )))
        }
    }
    match svc.replication.prepare_if_primary(&tenant).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return NodeResponse::Entered(Err(format!(
                "node {} is not the primary of {tenant:?}",
                svc.id
            )))
        }
        Err(e) => return NodeResponse::Entered(Err(e.to_string())),
    }
    NodeResponse::Entered(Ok(svc.replication.entered(&tenant, from)))
}

/// A member promises `ballot` to the tenant's new primary `from`, and says where its log stands.
pub async fn promise(svc: &Service, from: u64, tenant: String, ballot: u64) -> NodeResponse {
    if let Some(why) = refusal(svc, from, &tenant, ballot).await {
        return NodeResponse::Promised(Err(why));
    }
    let store = svc.store.clone();
    let promised = crate::blocking::spawn(move || {
        match store.promise(&tenant, ballot) {
            Ok(Ok(_)) => {}
            Ok(Err(refused)) => return Err(refused.to_string()),
            Err(e) => return Err(format!("store: {e}")),
        }
        // Promised all the same (older primaries are fenced), but a copy being rebuilt after a
        // lost disk must not help choose the log: it may lack acknowledged writes.
        if !store.counts(&tenant).map_err(|e| format!("store: {e}"))? {
            return Err("this node's copy is being rebuilt after it lost its disk".into());
        }
        let state = store.durable_state(&tenant).map_err(|e| format!("store: {e}"))?;
        Ok(ReplicaReport { ballots: state.ballots.to_wire(), last_lsn: state.last_lsn })
    })
    .await
    .unwrap_or_else(|e| Err(format!("store task failed: {e}")));
    NodeResponse::Promised(promised)
}

/// A member sends the tenant's new primary `from` its durable records after `after`.
pub async fn fetch(
    svc: &Service,
    from: u64,
    tenant: String,
    ballot: u64,
    after: u64,
) -> NodeResponse {
    if let Some(why) = refusal(svc, from, &tenant, ballot).await {
        return NodeResponse::Fetched(FetchedRecords::Refused(why));
    }
    let store = svc.store.clone();
    let fetched = crate::blocking::spawn(move || {
        let end = store.durable_state(&tenant)?.last_lsn;
        store.shipment(&tenant, after, end)
    })
    .await;
    NodeResponse::Fetched(match fetched {
        Ok(Ok(Shipment::Records { prev, ballot, bytes, last_lsn })) => FetchedRecords::Records {
            ballot,
            prev_ballot: prev.ballot,
            prev_lsn: prev.lsn,
            records: bytes,
            last_lsn,
        },
        Ok(Ok(Shipment::Nothing)) => FetchedRecords::Nothing,
        Ok(Ok(Shipment::Checkpointed)) => FetchedRecords::Checkpointed,
        Ok(Err(e)) => FetchedRecords::Refused(format!("store: {e}")),
        Err(e) => FetchedRecords::Refused(format!("store task failed: {e}")),
    })
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

    fn link() -> Link {
        Link { node: 2, state: Mutex::new(LinkState::default()), wake: Notify::new() }
    }

    #[test]
    fn a_realigned_backup_with_nothing_to_take_is_asked_whether_it_counts() {
        // Goal: a backup that applied a message whose answer was lost holds more than its
        // primary knew; its next append does not continue its log, and the realign finds it
        // holds all the primary wants. Its follow, a learner's until it answers, is asked at
        // its end with an empty append; answered by a member, it counts, and nothing more is
        // sent. A true learner's answer at its end asks nothing more either.
        let l = link();
        l.want("t", 5);
        assert_eq!(l.take_work().len(), 1, "the first append");
        l.heard("t", 3, false, None);
        l.take_work();
        l.want("t", 7);
        // The message with records 4..7 reached the backup; its answer did not reach here.
        l.realigned("t", 7, None);
        assert_eq!(l.member_durable("t"), None, "a learner's until it answers");
        let work = l.take_work();
        assert_eq!(work.len(), 1, "asked at its end, though nothing is to send");
        assert!(work[0].probe && work[0].after == 7 && work[0].upto == 7, "at its end");
        l.heard("t", 7, false, None);
        assert_eq!(l.member_durable("t"), Some(7), "counted once it answered as a member");
        assert!(l.take_work().is_empty(), "nothing more to send");
        // A copy being rebuilt answers as a learner: not asked again until there is more.
        l.realigned("t", 7, None);
        l.take_work();
        l.heard("t", 7, true, Some(9));
        assert!(l.take_work().is_empty(), "a learner holding all there is is not asked again");
        assert_eq!(l.member_durable("t"), None);
    }
}
