//! The checker's wiring, without a cluster: hand-made histories with a known verdict, the
//! stale-read mutation the cluster test applies to its own history, and a seeded differential
//! test showing that dropping indeterminate operations before the search changes no verdict.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use stateright::semantics::register::{Register, RegisterOp, RegisterRet};
use stateright::semantics::{ConsistencyTester, LinearizabilityTester};

use super::history::{check_key, with_a_stale_read, CheckError, Event, Key, Op, Outcome, Step};

const KEY: Key = Key { tenant: 0, phext: 0, coord: 0 };

/// Builds one key's history event by event.
#[derive(Default)]
struct H(Vec<Event>);

impl H {
    fn push(mut self, process: u64, step: Step) -> H {
        let at_ms = self.0.len() as u64;
        self.0.push(Event { at_ms, process, key: KEY, step });
        self
    }
    fn write(self, p: u64, v: &str) -> H {
        self.push(p, Step::Invoke(Op::Write(v.into())))
    }
    fn read(self, p: u64) -> H {
        self.push(p, Step::Invoke(Op::Read))
    }
    fn ok(self, p: u64) -> H {
        self.push(p, Step::Complete(Outcome::WriteOk))
    }
    fn saw(self, p: u64, v: &str) -> H {
        self.push(p, Step::Complete(Outcome::ReadOk(v.into())))
    }
    fn info(self, p: u64) -> H {
        self.push(p, Step::Complete(Outcome::Indeterminate("503".into())))
    }
}

/// `Ok` or the index of the event where the shortest unexplained prefix ends.
fn verdict(h: &H) -> Result<(), usize> {
    match check_key(&h.0) {
        Ok(()) => Ok(()),
        Err(CheckError::NotLinearizable { failing_at, .. }) => Err(failing_at),
        Err(e) => panic!("{e}"),
    }
}

// Goal: a sequential history whose reads return the latest write passes.
#[test]
fn a_sequential_history_passes() {
    let h = H::default().write(1, "a").ok(1).read(2).saw(2, "a").write(2, "b").ok(2);
    assert_eq!(verdict(&h.read(1).saw(1, "b")), Ok(()));
}

// Goal: a read of an overwritten value (stale) fails, at the stale read's completion.
#[test]
fn a_stale_read_fails() {
    let h = H::default().write(1, "a").ok(1).write(2, "b").ok(2).read(1).saw(1, "a");
    assert_eq!(verdict(&h), Err(5));
}

// Goal: a read of the initial (empty) value after an acknowledged write fails: a lost write.
#[test]
fn a_lost_write_fails() {
    assert_eq!(verdict(&H::default().write(1, "a").ok(1).read(2).saw(2, "")), Err(3));
}

// Goal: a value nobody wrote fails.
#[test]
fn a_value_never_written_fails() {
    assert_eq!(verdict(&H::default().read(1).saw(1, "ghost")), Err(1));
}

// Goal: a read concurrent with a write may return the old or the new value.
#[test]
fn a_read_concurrent_with_a_write_may_see_either() {
    for seen in ["", "a"] {
        let h = H::default().write(1, "a").read(2).saw(2, seen).ok(1);
        assert_eq!(verdict(&h), Ok(()), "read {seen:?}");
    }
}

// Goal: an indeterminate write may take effect late (after its client gave up), or never; but
// once a read saw it, a later read cannot see the value before it again.
#[test]
fn an_indeterminate_write_may_or_may_not_take_effect() {
    let h = H::default().write(1, "a").ok(1).write(2, "b").info(2);
    let h = h.read(3).saw(3, "a").read(3).saw(3, "b");
    assert_eq!(verdict(&h), Ok(()));
    let h = H::default().write(1, "a").ok(1).write(2, "b").info(2).read(3).saw(3, "a");
    assert_eq!(verdict(&h), Ok(()), "never took effect");
    let h = H::default().write(1, "a").ok(1).write(2, "b").info(2);
    let h = h.read(3).saw(3, "b").read(3).saw(3, "a");
    assert_eq!(verdict(&h), Err(7));
}

// Goal: the recording must retire a process after an indeterminate write; the checker refuses
// a history that does not (its in-flight write would be lost to the search).
#[test]
fn a_process_reused_after_an_indeterminate_write_is_malformed() {
    let h = H::default().write(1, "a").info(1).read(1).saw(1, "a");
    assert!(matches!(check_key(&h.0), Err(CheckError::Malformed(_))));
}

// Goal: the stale-read mutation the cluster test applies turns a passing history into a
// failing one, at the changed read.
#[test]
fn the_stale_read_mutation_is_caught() {
    let h = H::default().write(1, "a").ok(1).read(2).saw(2, "a").write(1, "b").ok(1);
    let h = h.read(2).saw(2, "b").write(1, "c").ok(1);
    assert_eq!(verdict(&h), Ok(()));
    let (stale, line) = with_a_stale_read(&h.0).expect("a read follows two writes");
    assert!(line.starts_with("event 7:"), "{line}");
    assert_eq!(verdict(&H(stale)), Err(7));
}

/// The tester fed every event, with indeterminate operations left in flight (a process goes on
/// after an indeterminate read under another thread id): the verdict without the reduction.
fn unreduced(events: &[Event]) -> bool {
    let mut tester = LinearizabilityTester::new(Register(String::new()));
    let mut generation: BTreeMap<u64, u64> = BTreeMap::new();
    for e in events {
        let thread = e.process * 1_000 + generation.get(&e.process).copied().unwrap_or(0);
        let fed = match &e.step {
            Step::Invoke(Op::Read) => tester.on_invoke(thread, RegisterOp::Read),
            Step::Invoke(Op::Write(v)) => tester.on_invoke(thread, RegisterOp::Write(v.clone())),
            Step::Complete(Outcome::ReadOk(v)) => {
                tester.on_return(thread, RegisterRet::ReadOk(v.clone()))
            }
            Step::Complete(Outcome::WriteOk) => tester.on_return(thread, RegisterRet::WriteOk),
            Step::Complete(Outcome::Indeterminate(_)) => {
                *generation.entry(e.process).or_default() += 1;
                continue;
            }
        };
        fed.unwrap();
    }
    tester.is_consistent()
}

/// A random history of three clients on one register that really applies each operation
/// between its invocation and completion; some answers are lost (indeterminate, and a lost
/// write may land later or never) and some reads are given a wrong value.
fn random_history(rng: &mut StdRng) -> Vec<Event> {
    let mut h = H::default();
    let (mut register, mut written) = (String::new(), vec![String::new()]);
    let mut clients: Vec<u64> = vec![0, 1, 2];
    let mut next_process = 3;
    // Per process: the operation in flight, and its read's answer once it took effect.
    let mut pending: BTreeMap<u64, (Op, Option<Option<String>>)> = BTreeMap::new();
    let mut late: Vec<String> = Vec::new();
    let mut invoked = 0;
    for _ in 0..40 {
        let slot = rng.gen_range(0..clients.len());
        let p = clients[slot];
        match pending.remove(&p) {
            None if invoked < 8 => {
                invoked += 1;
                let op = if rng.gen_bool(0.5) {
                    written.push(format!("v{invoked}"));
                    Op::Write(format!("v{invoked}"))
                } else {
                    Op::Read
                };
                h = h.push(p, Step::Invoke(op.clone()));
                pending.insert(p, (op, None));
            }
            None => {}
            Some((op, None)) if rng.gen_bool(0.15) => {
                // Answer lost before it took effect: a write may still land later.
                if let Op::Write(v) = op {
                    late.push(v);
                    clients[slot] = next_process;
                    next_process += 1;
                }
                h = h.info(p);
            }
            Some((op, None)) => {
                let seen = match &op {
                    Op::Write(v) => {
                        register = v.clone();
                        None
                    }
                    Op::Read => Some(register.clone()),
                };
                pending.insert(p, (op, Some(seen)));
            }
            Some((op, Some(seen))) => {
                h = match (op, seen) {
                    (Op::Write(_), _) if rng.gen_bool(0.15) => {
                        clients[slot] = next_process;
                        next_process += 1;
                        h.info(p)
                    }
                    (Op::Write(_), _) => h.ok(p),
                    (Op::Read, Some(_)) if rng.gen_bool(0.15) => {
                        let wrong = written[rng.gen_range(0..written.len())].clone();
                        h.saw(p, &wrong)
                    }
                    (Op::Read, Some(v)) => h.saw(p, &v),
                    (Op::Read, None) => unreachable!("a read that took effect has an answer"),
                };
            }
        }
        if !late.is_empty() && rng.gen_bool(0.1) {
            register = late.remove(rng.gen_range(0..late.len()));
        }
    }
    // Operations still in flight end as lost answers.
    for (p, _) in pending {
        h = h.info(p);
    }
    h.0
}

// Goal: dropping indeterminate reads and never-read indeterminate writes before the search
// gives the same verdict as the tester fed everything, on 2,000 seeded random histories, of
// which a fair share pass and a fair share fail (so both verdicts are compared).
#[test]
fn the_reduction_changes_no_verdict() {
    let mut rng = StdRng::seed_from_u64(16);
    let (mut passed, mut failed) = (0, 0);
    for i in 0..2_000 {
        let events = random_history(&mut rng);
        let full = unreduced(&events);
        let reduced = match check_key(&events) {
            Ok(()) => true,
            Err(CheckError::NotLinearizable { .. }) => false,
            Err(e) => panic!("history {i}: {e}"),
        };
        assert_eq!(reduced, full, "history {i}: {events:#?}");
        if full {
            passed += 1;
        } else {
            failed += 1;
        }
    }
    assert!(passed > 200 && failed > 200, "{passed} passed, {failed} failed");
}
