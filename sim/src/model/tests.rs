use super::*;

fn cell(n: u32) -> CellKey {
    CellKey {
        phext: "doc".into(),
        coord: Coordinate::from_components([1, 1, 1, 1, 1, 1, 1, 1, n]).unwrap(),
    }
}

fn write(m: &mut Model, c: &CellKey, value: &str, at: u64, outcome: Outcome) -> u64 {
    let id = m.begin_write("t1", c, value.to_string(), at, at + 100);
    m.end_write(id, outcome, at + 10);
    id
}

// Goal: the checker fails on a planted lost write: after `b` was acknowledged, a read that
// returns the older `a` (or nothing) is reported; the acknowledged value passes.
#[test]
fn a_planted_lost_write_is_caught() {
    let mut m = Model::default();
    m.add_tenant("t1", 1 << 20);
    let c = cell(1);
    write(&mut m, &c, "<t1#a>", 0, Outcome::Acked);
    write(&mut m, &c, "<t1#b>", 20, Outcome::Acked);
    assert!(m.check_read("t1", &c, 40, "<t1#b>", false).is_ok());
    let stale = m.check_read("t1", &c, 40, "<t1#a>", false).unwrap_err();
    assert_eq!(stale.invariant, Invariant::StaleRead);
    let lost = m.check_read("t1", &c, 40, "", true).unwrap_err();
    assert_eq!(lost.invariant, Invariant::LostWrite);
    // A read that started before `b` was acknowledged may still see `a`.
    assert!(m.check_read("t1", &c, 25, "<t1#a>", false).is_ok());
}

// Goal: an insert whose outcome is open may land on top of a later write (a frozen node runs
// it when it resumes), so later value + its text is allowed; an acknowledged insert never
// lands late, and text appended twice is still refused.
#[test]
fn an_open_insert_may_land_after_a_later_write() {
    let mut m = Model::default();
    let c = cell(3);
    write(&mut m, &c, "<t1#a>", 0, Outcome::Acked);
    let insert = m.begin_write("t1", &c, "<t1#a><t1#i>".into(), 20, 120);
    m.set_appended(insert, "<t1#i>");
    m.end_write(insert, Outcome::Unknown, 30);
    write(&mut m, &c, "<t1#u>", 40, Outcome::Unknown);
    for seen in ["<t1#a><t1#i>", "<t1#u>", "<t1#u><t1#i>", "<t1#a>"] {
        assert!(m.check_read("t1", &c, 60, seen, false).is_ok(), "{seen}");
    }
    assert!(m.check_read("t1", &c, 60, "<t1#u><t1#i><t1#i>", false).is_err());
    let mut m = Model::default();
    write(&mut m, &c, "<t1#a>", 0, Outcome::Acked);
    let insert = m.begin_write("t1", &c, "<t1#a><t1#i>".into(), 20, 120);
    m.set_appended(insert, "<t1#i>");
    m.end_write(insert, Outcome::Acked, 30);
    write(&mut m, &c, "<t1#u>", 40, Outcome::Acked);
    assert!(m.check_read("t1", &c, 60, "<t1#u><t1#i>", false).is_err());
}

// Goal: an unknown write stays possible until an acknowledged write issued after its horizon
// supersedes it; a refused write is never possible.
#[test]
fn unknown_writes_until_superseded() {
    let mut m = Model::default();
    let c = cell(2);
    write(&mut m, &c, "<t1#a>", 0, Outcome::Acked);
    write(&mut m, &c, "<t1#u>", 20, Outcome::Unknown);
    write(&mut m, &c, "<t1#n>", 40, Outcome::NotApplied);
    assert!(m.check_read("t1", &c, 60, "<t1#u>", false).is_ok());
    assert!(m.check_read("t1", &c, 60, "<t1#n>", false).is_err());
    write(&mut m, &c, "<t1#b>", 60, Outcome::Acked);
    assert!(m.check_read("t1", &c, 80, "<t1#u>", false).is_ok(), "b was issued before u's horizon");
    write(&mut m, &c, "<t1#c>", 200, Outcome::Acked);
    assert!(
        m.check_read("t1", &c, 300, "<t1#u>", false).is_err(),
        "c, issued after u's horizon, supersedes it"
    );
    assert_eq!(m.certain("t1", &c).as_deref(), Some("<t1#c>"));
}

// Goal: a session that read a newer write and then an older acknowledged one is caught
// (the cell went back), even while the newer write is still pending; an older write whose
// answer was lost may land late and is not held against the session.
#[test]
fn a_session_never_reads_back_in_time() {
    let mut m = Model::default();
    let c = cell(4);
    write(&mut m, &c, "<t1#a>", 0, Outcome::Acked);
    let pending = m.begin_write("t1", &c, "<t1#b>".into(), 20, 120);
    assert!(m.check_read("t1", &c, 30, "<t1#b>", false).is_ok());
    assert!(m.observe(1, "t1", &c, "<t1#b>").is_ok());
    assert!(m.check_read("t1", &c, 40, "<t1#a>", false).is_ok(), "the per-cell set allows it");
    let back = m.observe(1, "t1", &c, "<t1#a>").unwrap_err();
    assert_eq!(back.invariant, Invariant::StaleRead);
    assert!(m.observe(2, "t1", &c, "<t1#a>").is_ok(), "another session never saw b");
    m.end_write(pending, Outcome::Acked, 50);
    let c2 = cell(5);
    write(&mut m, &c2, "<t1#u>", 0, Outcome::Unknown);
    write(&mut m, &c2, "<t1#v>", 20, Outcome::Acked);
    assert!(m.observe(1, "t1", &c2, "<t1#v>").is_ok());
    assert!(m.observe(1, "t1", &c2, "<t1#u>").is_ok(), "u may land after v");
}

// Goal: a 507 is deserved only when the write takes the tenant past the quota the node
// names, in some state the tenant may be in; one that fits, or names a quota never given,
// or whose own account says it fits, is a wrongful refusal.
#[test]
fn refusals_are_checked_against_the_quota_in_force() {
    let mut m = Model::default();
    m.add_tenant("t1", 100);
    let (a, b) = (cell(1), cell(2));
    write(&mut m, &a, &"a".repeat(40), 0, Outcome::Acked);
    // 40 bytes in a, a break, then b: 40 + 1 + len(b).
    let fits = "b".repeat(59);
    let over = "b".repeat(60);
    assert_eq!(m.bytes_with("t1", &b, &fits), 100);
    assert_eq!(m.certain_bytes("t1"), Some(40));
    let wrong = m.check_quota_refusal("t1", &b, &fits, 10, 60, 59, 100).unwrap_err();
    assert_eq!(wrong.invariant, Invariant::WrongfulRefusal, "it fits exactly");
    assert!(m.check_quota_refusal("t1", &b, &over, 10, 61, 60, 100).is_ok());
    let never = m.check_quota_refusal("t1", &b, &over, 10, 61, 60, 50).unwrap_err();
    assert_eq!(never.invariant, Invariant::WrongfulRefusal, "no quota of 50 was given");
    let own = m.check_quota_refusal("t1", &b, &over, 10, 60, 60, 100).unwrap_err();
    assert_eq!(own.invariant, Invariant::WrongfulRefusal, "needed == free fits");
    // A pending write that may have made a longer makes the refusal possible.
    m.begin_write("t1", &a, "a".repeat(45), 20, 200);
    assert!(m.check_quota_refusal("t1", &b, &fits, 30, 61, 60, 100).is_ok());
}

// Goal: a 429 is deserved only by a limit the tenant was given, once its clients sent that
// many units; a burst refusal needs at least a bucket's worth.
#[test]
fn rate_refusals_are_checked_against_what_was_sent() {
    let mut m = Model::default();
    m.add_tenant("t1", 1 << 20);
    m.allow_daily_limit("t1", 3);
    let reason = "daily limit of 3 requests reached";
    assert!(m.check_rate_limited("t1", reason).is_err(), "nothing was sent");
    for _ in 0..2 {
        m.sent("t1", 10);
    }
    // Each request counts at most 1 unit plus 1 per MiB it may move (the answer: at most
    // the tenant's data, here its 1 MiB quota).
    assert!(m.check_rate_limited("t1", reason).is_ok());
    let never = m.check_rate_limited("t1", "daily limit of 2 requests reached").unwrap_err();
    assert_eq!(never.invariant, Invariant::WrongfulRefusal);
    let burst = m.check_rate_limited("t1", "more than 1000 requests per second").unwrap_err();
    assert_eq!(burst.invariant, Invariant::WrongfulRefusal);
}

// Goal: another tenant's data is reported as an isolation breach, and a tenant past its
// largest quota as a quota breach.
#[test]
fn isolation_and_quota_are_checked() {
    let mut m = Model::default();
    m.add_tenant("t1", 64);
    let c = cell(3);
    let breach = m.check_read("t1", &c, 0, "<t2#x>", false).unwrap_err();
    assert_eq!(breach.invariant, Invariant::Isolation);
    write(&mut m, &c, &format!("<t1#big>{}", "x".repeat(100)), 0, Outcome::Acked);
    assert_eq!(m.check_quota("t1").unwrap_err().invariant, Invariant::Quota);
    m.allow_quota("t1", 1 << 20);
    assert!(m.check_quota("t1").is_ok());
}
