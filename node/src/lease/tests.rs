use super::*;
use crate::store::ManualClock;
use raft_registry::command::apply;

/// A voter just started at 10 s on its clock, and the registry of three active nodes it sees.
fn voter() -> (Arc<ManualClock>, Leases, RegistryState) {
    let clock = Arc::new(ManualClock::new(10_000));
    let leases = Leases::new(clock.clone());
    (clock, leases, cluster())
}

/// Marks `id` down or up as the registry leader does: decided on its latest mark in `s`.
fn mark(s: &mut RegistryState, id: u64, down: bool) {
    let last_mark = s.mark_epoch(id);
    let command = if down {
        Command::MarkDownAfter { id, last_mark }
    } else {
        Command::MarkUpAfter { id, last_mark }
    };
    apply(s, command).expect("marked");
}

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
    // it from then on, also after a mark down, until a mark up after the confirmation.
    let (clock, leases, mut s) = voter();
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
    mark(&mut s, 2, true);
    assert!(!leases.grant(2, &s));
    mark(&mut s, 2, false);
    assert!(leases.grant(2, &s), "granted after a mark up");
    assert!(!leases.confirm_down(2, &s), "and heard again");
    // Marked down by a leader this voter did not confirm for: refused all the same.
    mark(&mut s, 1, true);
    assert!(!leases.grant(1, &s));
}

#[test]
fn a_voter_refuses_a_heard_node_long_without_a_lease_and_confirms_it_once_its_grant_is_old() {
    // Goal: a node still heard that says it has been without a lease for twice the down
    // time (refused by the other half of an even number of voters) is refused from the
    // leader's first question on, and confirmed only once this voter's last grant to it is
    // the down time old; a node that says it lost its lease only briefly is neither.
    let (clock, leases, s) = voter();
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
    let (clock, leases, mut s) = voter();
    clock.advance_ms(DOWN_AFTER_MS);
    mark(&mut s, 2, true);
    mark(&mut s, 2, false);
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
    let (clock, leases, s) = voter();
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
    let (clock, leases, mut s) = voter();
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

#[test]
fn a_refusal_ends_with_the_mark_up_that_answered_it() {
    // Goal: once the registry marked a node down and then up after this voter confirmed it, the
    // voter neither refuses it nor confirms it down for that old confirmation, even before the
    // node's first lease request since (the leader marked such a node down again at once, and
    // its tenants moved away and back). A refusal no mark answered still stands.
    let (clock, leases, mut s) = voter();
    clock.advance_ms(DOWN_AFTER_MS);
    assert!(leases.grant(2, &s) && leases.grant(3, &s));
    clock.advance_ms(DOWN_AFTER_MS);
    assert!(leases.confirm_down(2, &s) && leases.confirm_down(3, &s));
    assert!(leases.refuses(2, &s) && leases.refuses(3, &s));
    mark(&mut s, 2, true);
    clock.advance_ms(DOWN_AFTER_MS);
    assert!(!leases.grant(2, &s), "back, and refused, but heard (what has it marked up)");
    assert!(leases.refuses(2, &s), "marked down, not yet up");
    mark(&mut s, 2, false);
    assert!(!leases.confirm_down(2, &s), "heard, though granted nothing for the down time");
    assert!(!leases.refuses(2, &s), "the mark up answered the refusal");
    assert!(leases.refuses(3, &s), "node 3 was never marked: the refusal stands");
    assert!(leases.confirm_down(3, &s), "and its old grant is the down time old");
}
