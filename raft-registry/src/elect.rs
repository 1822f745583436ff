//! When a node calls a registry election: our own timer in place of openraft's; and the log
//! line of each change of leader (`log_leaders`).
//!
//! openraft 0.9 draws a node's election timeout once, when the node starts, and checks it on a
//! tick every 1.5 heartbeats. Two nodes that start together with timeouts that round to the same
//! tick then stand as candidates in the same instant after every failed election, and under
//! standard Raft (one vote per term) each votes for itself forever: the simulator found a cluster
//! of two live voters with no leader for 90 s. This timer draws a fresh random delay before every
//! election, the remedy the Raft paper gives for split votes.
//!
//! The rules (openraft's own elections are switched off, `enable_elect = false`):
//! - a node waits [`Timing::lease`] plus a fresh random delay in `[0, jitter)` after it last heard
//!   a leader (an AppendEntries or snapshot it accepted), granted a vote, or stood itself;
//! - the wait is never shorter than the lease voters keep for a leader they heard, so a vote
//!   asked for is not refused for a lease that has not run out;
//! - except after this node's own candidacy, if it has heard no leader and granted no vote
//!   since: the election split or was lost to silence, no voter holds a lease to wait out
//!   (openraft keeps one only for a committed vote, a leader's), and the node stands again after
//!   [`Timing::retry`] plus a fresh random delay. Waiting the lease again, a split vote after a
//!   leader froze cost 1.3–1.8 s more (a frozen leader's tenants took writes after 2.6 s);
//! - a node that asked for votes and heard of a longer log than its own waits
//!   [`Timing::behind`] more before it stands again (openraft's own rule, which its timer kept
//!   and this one keeps): a voter with the longer log refuses it, and while it stood its term
//!   went up in step with the nodes that could win, whose candidacies then found the voters
//!   already spent on it in that term, round after round. The extra wait lasts until the node
//!   hears a leader: kept longer, a node that once lost an election waited it again at the next
//!   failover, and with every follower marked so, each election took the lease, the jitter and
//!   4 s more (6.2 s instead of 2–3 s in `benches/failover`);
//! - a leader and a non-voter never stand; the sole voter of a cluster stands at once;
//! - a timer that fires more than [`SCHEDULE_GAP_MAX`] late means the process was frozen
//!   (SIGSTOP, a VM pause): it counts as having just heard the leader, so a node that wakes from
//!   a pause does not depose a healthy leader before it has listened for one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::{AsyncRuntime, ServerState};
use rand::Rng;
use tokio::time::Instant;

use crate::runtime::RegistryRuntime;
use crate::types::{NodeId, Raft};

/// A timer that fires later than this slept through a freeze, not through a silent leader.
pub const SCHEDULE_GAP_MAX: Duration = Duration::from_millis(500);

/// How often a leader's timer looks whether it still leads (for [`Heard::leading_for`]).
const LEADING_CHECK: Duration = Duration::from_millis(100);

/// How long the sole voter of a cluster waits between elections it stands in.
const SOLE_VOTER_RETRY: Duration = Duration::from_millis(100);

/// The election timing, from [`crate::RegistryConfig`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// What voters keep for a leader they heard (openraft's leader lease, its
    /// `election_timeout_max`).
    pub(crate) lease: Duration,
    /// The random part of each wait is drawn from `[0, jitter)`.
    pub(crate) jitter: Duration,
    /// The extra wait of a node that heard of a longer log than its own.
    pub(crate) behind: Duration,
    /// The fixed part of the wait after this node's own candidacy, in place of the lease:
    /// enough for its vote requests to be answered.
    pub(crate) retry: Duration,
}

impl Timing {
    /// How long after `heard.at()` a node stands, with `drawn` its random delay.
    fn wait(&self, heard: &Heard, drawn: Duration) -> Duration {
        let fixed = if heard.stood() { self.retry } else { self.lease };
        let extra = if heard.behind() { self.behind } else { Duration::ZERO };
        fixed + drawn + extra
    }
}

/// What the timer listens for: the last time this node heard a leader, granted a vote, or
/// stood, and whether that last event was its own candidacy; and whether a voter it asked since
/// it last stood holds a longer log.
#[derive(Debug)]
pub(crate) struct Heard {
    at: Mutex<Instant>,
    stood: AtomicBool,
    behind: AtomicBool,
    /// When this node last accepted a leader's entries or snapshot (not a vote): a node removed
    /// while it was away hears no leader, a member does ([`crate::removal`]).
    leader_at: Mutex<Option<Instant>>,
    /// The term this node leads in and since when, as its timer last saw ([`LEADING_CHECK`]
    /// late at most).
    leading_since: Mutex<Option<(u64, Instant)>>,
}

impl Heard {
    pub(crate) fn now() -> Arc<Heard> {
        Arc::new(Heard {
            at: Mutex::new(Instant::now()),
            stood: AtomicBool::new(false),
            behind: AtomicBool::new(false),
            leader_at: Mutex::new(None),
            leading_since: Mutex::new(None),
        })
    }

    /// This node heard a leader, granted a vote, or was asked to stand.
    pub(crate) fn mark(&self) {
        *self.at.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.stood.store(false, Ordering::Relaxed);
    }

    /// This node's timer made it stand.
    fn mark_stood(&self) {
        self.mark();
        self.stood.store(true, Ordering::Relaxed);
    }

    fn stood(&self) -> bool {
        self.stood.load(Ordering::Relaxed)
    }

    /// This node accepted a leader's entries or snapshot. Whatever longer log it heard of in an
    /// election is the past: the leader brings its log up to date, so its next candidacy (after
    /// this leader fails) waits no extra time for it.
    pub(crate) fn mark_leader(&self) {
        self.mark();
        self.behind.store(false, Ordering::Relaxed);
        *self.leader_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// How long ago this node last accepted a leader's entries or snapshot, if ever.
    pub(crate) fn leader_ago(&self) -> Option<Duration> {
        let at = *self.leader_at.lock().unwrap_or_else(|p| p.into_inner());
        at.map(|at| at.elapsed())
    }

    /// How long this node has led, as its timer saw it; `None` while it does not lead.
    pub(crate) fn leading_for(&self) -> Option<Duration> {
        let since = *self.leading_since.lock().unwrap_or_else(|p| p.into_inner());
        since.map(|(_, at)| at.elapsed())
    }

    /// Records that this node leads in `term` (from now, unless it already did), or does not.
    fn set_leading(&self, term: Option<u64>) {
        let mut since = self.leading_since.lock().unwrap_or_else(|p| p.into_inner());
        match (term, *since) {
            (Some(term), Some((led, _))) if led == term => {}
            (Some(term), _) => *since = Some((term, Instant::now())),
            (None, _) => *since = None,
        }
    }

    /// A voter answered this node's vote request with a longer log than the request's.
    pub(crate) fn saw_longer_log(&self) {
        self.behind.store(true, Ordering::Relaxed);
    }

    fn at(&self) -> Instant {
        *self.at.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn behind(&self) -> bool {
        self.behind.load(Ordering::Relaxed)
    }
}

/// Logs every change of the registry's leader as this node sees it, with the term: the lines
/// an operator needs of an election. openraft's own lines are off by default (the
/// `sq-cloud` binary's log filter): about 15 at INFO per election, and three at WARN and ERROR
/// per heartbeat for every voter it cannot reach.
pub(crate) async fn log_leaders(raft: Raft) {
    let mut metrics = raft.metrics();
    // A node starts knowing no leader: only losing one is worth a line.
    let mut last = Some(None);
    loop {
        let (leader, term, stopped) = {
            let m = metrics.borrow_and_update();
            (m.current_leader, m.current_term, m.running_state.is_err())
        };
        if stopped {
            return;
        }
        if last != Some(leader) {
            match leader {
                Some(leader) => tracing::info!(leader, term, "registry leader"),
                None => tracing::info!(term, "registry leader unknown (an election)"),
            }
            last = Some(leader);
        }
        if metrics.changed().await.is_err() {
            return;
        }
    }
}

/// Runs the election timer of node `me` until its Raft stops.
pub(crate) async fn run(raft: Raft, me: NodeId, timing: Timing, heard: Arc<Heard>) {
    loop {
        let (leading, voter, sole_voter) = {
            let metrics = raft.metrics();
            let m = metrics.borrow();
            if m.running_state.is_err() {
                return;
            }
            let membership = m.membership_config.membership();
            let voters: Vec<NodeId> = membership.voter_ids().collect();
            heard.set_leading((m.state == ServerState::Leader).then_some(m.current_term));
            (m.state == ServerState::Leader, voters.contains(&me), voters == [me])
        };
        if leading {
            heard.mark();
            tokio::time::sleep(LEADING_CHECK).await;
            continue;
        }
        if !voter {
            heard.mark();
            tokio::time::sleep(timing.lease).await;
            continue;
        }
        if sole_voter {
            if raft.trigger().elect().await.is_err() {
                return;
            }
            tokio::time::sleep(SOLE_VOTER_RETRY).await;
            continue;
        }
        let jitter = timing.jitter.as_millis() as u64;
        let drawn = Duration::from_millis(if jitter == 0 {
            0
        } else {
            <RegistryRuntime as AsyncRuntime>::thread_rng().gen_range(0..jitter)
        });
        let deadline = heard.at() + timing.wait(&heard, drawn);
        tokio::time::sleep_until(deadline).await;
        let now = Instant::now();
        if now.saturating_duration_since(deadline) > SCHEDULE_GAP_MAX {
            tracing::info!(
                late_ms = now.saturating_duration_since(deadline).as_millis() as u64,
                "election timer woke late (the process was frozen); listening for a leader first"
            );
            heard.mark();
            continue;
        }
        if heard.at() + timing.wait(&heard, drawn) > now {
            continue; // heard a leader, granted a vote, or learnt it is behind, while asleep
        }
        if raft.metrics().borrow().state == ServerState::Leader {
            continue; // won the election it stood in while asleep
        }
        heard.mark_stood();
        heard.behind.store(false, Ordering::Relaxed);
        if raft.trigger().elect().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: how long a node has led counts from the start of its term in office: the same term
    // keeps the start, a new term (lost and won again between two looks) starts over, and not
    // leading forgets it.
    #[tokio::test(start_paused = true)]
    async fn leading_counts_from_the_term_in_office() {
        let heard = Heard::now();
        assert_eq!(heard.leading_for(), None);
        heard.set_leading(Some(3));
        tokio::time::advance(Duration::from_secs(2)).await;
        heard.set_leading(Some(3));
        assert_eq!(heard.leading_for(), Some(Duration::from_secs(2)));
        heard.set_leading(Some(4));
        assert_eq!(heard.leading_for(), Some(Duration::ZERO), "a new term starts over");
        heard.set_leading(None);
        assert_eq!(heard.leading_for(), None);
    }

    // Goal: a node stands the lease after it heard a leader or granted a vote, and only the
    // retry time after its own candidacy while nothing else was heard; the longer-log wait adds
    // to either.
    #[tokio::test(start_paused = true)]
    async fn a_node_stands_again_soon_after_its_own_candidacy() {
        let timing = Timing {
            lease: Duration::from_millis(1300),
            jitter: Duration::from_millis(500),
            behind: Duration::from_millis(2600),
            retry: Duration::from_millis(250),
        };
        let drawn = Duration::from_millis(40);
        let heard = Heard::now();
        assert_eq!(timing.wait(&heard, drawn), Duration::from_millis(1340));
        heard.mark_stood();
        assert_eq!(timing.wait(&heard, drawn), Duration::from_millis(290), "after its candidacy");
        heard.saw_longer_log();
        assert_eq!(timing.wait(&heard, drawn), Duration::from_millis(2890));
        heard.mark_stood();
        heard.behind.store(false, Ordering::Relaxed);
        heard.mark();
        assert_eq!(timing.wait(&heard, drawn), Duration::from_millis(1340), "a vote granted");
        heard.mark_stood();
        heard.mark_leader();
        assert_eq!(timing.wait(&heard, drawn), Duration::from_millis(1340), "a leader heard");
    }

    // Goal: a node that heard of a longer log in an election waits the extra time only until a
    // leader's entries reach it; a granted vote (mark) does not end it.
    #[test]
    fn hearing_a_leader_ends_the_wait_for_a_longer_log() {
        let heard = Heard::now();
        heard.saw_longer_log();
        heard.mark();
        assert!(heard.behind(), "a vote granted is no leader heard");
        assert_eq!(heard.leader_ago(), None);
        heard.mark_leader();
        assert!(!heard.behind(), "a leader heard ends the extra wait");
        assert!(heard.leader_ago().is_some());
    }
}
