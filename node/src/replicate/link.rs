//! The primary's side of shipping: one [`Link`] per backup node, what it knows of each tenant
//! on that node ([`Follow`]), and the task that sends a link's pending records one message at a
//! time ([`send_loop`]).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use proto::cluster::{NodeRequest, NodeResponse, ReplicaAck, ReplicaAppend};
use tokio::sync::Notify;

use super::{locked, Replication};
use crate::store::{LogPosition, Shared, Shipment, Store, StoreError};

/// How long a link waits after a failed message before it sends again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_millis(200);

/// How long an idle link sleeps between looks for work when nothing wakes it.
const IDLE_LOOK: Duration = Duration::from_secs(1);

/// The most record bytes one `Replicate` message carries (16 MiB, a quarter of the message
/// limit); tenants past it wait for the next message.
const REPLICATE_MESSAGE_BYTES_MAX: usize = 16 << 20;

/// The records of every tenant this node is primary of, to one backup node.
pub(super) struct Link {
    node: u64,
    pub(super) state: Mutex<LinkState>,
    wake: Notify,
}

#[derive(Default)]
pub(super) struct LinkState {
    pub(super) follows: HashMap<String, Follow>,
    /// Tenants with records to send.
    dirty: BTreeSet<String>,
    /// The last message failed to reach the node.
    pub(super) unreachable: bool,
}

/// One tenant on one backup, as the primary knows it.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Follow {
    /// Where the backup's log ends, durably, as it last answered; `None` before its first answer.
    pub(super) durable: Option<u64>,
    /// The last record the backup is to hold: the newest durable record a request waits for.
    want: u64,
    /// The backup is to cut its log after this record before it takes more, as long as its log
    /// still ends where it said (the second): it holds records past the first that this
    /// primary's log does not.
    truncate: Option<(u64, u64)>,
    pub(super) stuck: Option<Stuck>,
    /// The backup's copy does not count yet (its node lost its disk): its acknowledgements are
    /// not counted toward a majority.
    pub(super) learner: bool,
    /// The learner holds what this node held when it prepared: tell it it counts.
    promote: bool,
}

/// What a link sends a backup next for one tenant.
pub(super) struct Work {
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
pub(super) enum Stuck {
    /// The records it lacks are folded into the primary's phext files, or the records it must
    /// cut into its own.
    NeedsSnapshot,
}

impl Replication {
    /// The link to `node`, made (with its sending task) on first use.
    pub(super) fn link(&self, node: u64) -> Arc<Link> {
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

    /// Sends one message of `link`'s pending records; false when it failed (the caller waits
    /// before the next).
    async fn ship(&self, link: &Link, work: Vec<Work>) -> bool {
        let state = self.registry.state();
        let (ballots, keep) = self.sendable(link, work, &state);
        let shipments = self.shipments(keep).await;
        let (appends, sent, bytes) = self.appends(link, shipments, &ballots, &state);
        if appends.is_empty() {
            return true;
        }
        crate::metrics::replication_bytes(bytes as u64);
        let answer = self.call(link.node, NodeRequest::Replicate { from: self.id, appends }).await;
        match answer {
            Ok(NodeResponse::Replicated(acks)) if acks.len() == sent.len() => {
                self.answered(link, sent, acks, &ballots).await
            }
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
                false
            }
        }
    }

    /// The work `link` may send now, with the ballot each tenant goes out under. Records go out
    /// under the ballot this node prepared the tenant at, never a later epoch it has not
    /// prepared: a backup that promised a newer primary refuses them, so a node back from a
    /// pause can neither overwrite nor cut what a newer primary wrote.
    fn sendable(
        &self,
        link: &Link,
        work: Vec<Work>,
        state: &raft_registry::RegistryState,
    ) -> (HashMap<String, u64>, Vec<Work>) {
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
        (ballots, keep)
    }

    /// What each piece of work sends: records still kept in memory are taken without a hop to
    /// the blocking pool; the rest, and probes, are read there.
    async fn shipments(&self, keep: Vec<Work>) -> Vec<(Work, Result<Shipment, StoreError>)> {
        let mut shipments = Vec::with_capacity(keep.len());
        let mut slow = Vec::new();
        for w in keep {
            match (!w.probe).then(|| self.store.shipment_in_memory(&w.tenant, w.after, w.upto)) {
                Some(Some(shipment)) => shipments.push((w, Ok(shipment))),
                _ => slow.push(w),
            }
        }
        if slow.is_empty() {
            return shipments;
        }
        let store = self.store.clone();
        let read = crate::blocking::spawn(move || {
            slow.into_iter()
                .map(|w| {
                    let shipment = match w.probe {
                        true => probe(&store, &w),
                        false => store.shipment(&w.tenant, w.after, w.upto),
                    };
                    (w, shipment)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        shipments.extend(read);
        shipments
    }

    /// The appends of one message, the tenants they carry with the last record of each, and
    /// their record bytes; records past [`REPLICATE_MESSAGE_BYTES_MAX`] wait for the next one.
    fn appends(
        &self,
        link: &Link,
        shipments: Vec<(Work, Result<Shipment, StoreError>)>,
        ballots: &HashMap<String, u64>,
        state: &raft_registry::RegistryState,
    ) -> (Vec<ReplicaAppend>, Vec<(String, u64)>, usize) {
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
        (appends, sent, bytes)
    }

    /// Takes a backup's answers to one message, one per tenant `sent`; false when it refused
    /// any (the link waits before it sends again).
    async fn answered(
        &self,
        link: &Link,
        sent: Vec<(String, u64)>,
        acks: Vec<ReplicaAck>,
        ballots: &HashMap<String, u64>,
    ) -> bool {
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
}

impl Link {
    pub(super) fn want(&self, tenant: &str, lsn: u64) {
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
    pub(super) fn settled(&self, tenant: &str) -> bool {
        let st = locked(&self.state);
        let Some(f) = st.follows.get(tenant) else { return true };
        !st.dirty.contains(tenant)
            && f.durable >= Some(f.want)
            && f.truncate.is_none()
            && f.stuck.is_none()
            && !f.promote
    }

    /// Where the backup's log ends, durably, if its copy counts (it is no learner).
    pub(super) fn member_durable(&self, tenant: &str) -> Option<u64> {
        locked(&self.state).follows.get(tenant).filter(|f| !f.learner).and_then(|f| f.durable)
    }

    /// `Some(durable)` when this link follows the tenant (`durable` `None` if not yet heard).
    pub(super) fn durable_if_followed(&self, tenant: &str) -> Option<Option<u64>> {
        locked(&self.state).follows.get(tenant).map(|f| f.durable)
    }

    pub(super) fn mark_dirty(&self, tenant: &str) {
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
    pub(super) fn forget(&self, tenant: &str) {
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

/// An append of no records that asks a backup whether its log ends where `w` says: at its end
/// after the cut, if one is asked, else at `upto`.
fn probe(store: &Store, w: &Work) -> Result<Shipment, StoreError> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
