//! The history of a register test and its check.
//!
//! Clients record every invocation before they send it and every completion after its answer
//! arrives, both under one lock, so the order of the recorded events is an order real time
//! allows: an operation that completed before another was invoked comes first. Each key is an
//! independent register, checked on its own by stateright's `LinearizabilityTester` with its
//! `Register` model, which searches for a total order that respects real time and explains
//! every read.
//!
//! An operation answered with an error or not answered in time is indeterminate: it may have
//! taken effect, at any moment after its invocation, or never. Its process is retired (the
//! client goes on under a fresh process id) so that it stays in flight for good, which is how
//! the tester treats an operation that may or may not have happened. Before the search two
//! kinds of indeterminate operation are dropped, which changes no verdict and keeps the search
//! small: reads (a read with no answer constrains nothing) and writes whose value no read ever
//! returned (a linearization that places such a write can leave it out: no read sees it, so
//! every read in it still returns the latest write placed before it).

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Instant;

use stateright::semantics::register::{Register, RegisterOp, RegisterRet};
use stateright::semantics::{ConsistencyTester, LinearizabilityTester};

/// The events printed before the first one a failing history cannot explain.
pub const EXCERPT_EVENTS: usize = 24;

/// What a register holds: the scroll's text. The empty scroll is the initial value.
pub type Value = String;

/// One register: the indices of a tenant, one of its phexts and a coordinate in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub tenant: usize,
    pub phext: usize,
    pub coord: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write(Value),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    ReadOk(Value),
    WriteOk,
    /// An error answer or none in time (the reason is for the reader of a failure).
    Indeterminate(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Invoke(Op),
    Complete(Outcome),
}

/// One recorded event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Milliseconds since the recorder started, for the reader only: the order is the index.
    pub at_ms: u64,
    pub process: u64,
    pub key: Key,
    pub step: Step,
}

/// The shared, append-only history of one run.
pub struct Recorder {
    start: Instant,
    events: Mutex<Vec<Event>>,
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder { start: Instant::now(), events: Mutex::new(Vec::new()) }
    }

    /// Records `step`; call `Invoke` before sending and `Complete` after the answer arrived.
    pub fn record(&self, process: u64, key: Key, step: Step) {
        let mut events = self.events.lock().unwrap();
        // The clock is read under the lock, so times never go backwards along the history.
        let at_ms = self.start.elapsed().as_millis() as u64;
        events.push(Event { at_ms, process, key, step });
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }
}

/// Why a key's history failed its check.
#[derive(Debug)]
pub enum CheckError {
    /// The recording itself breaks the rules (the test's bug, not the cluster's).
    Malformed(String),
    /// No linearization exists. `failing_at` is the index, in the key's `events`, of the event
    /// that ends the shortest prefix no linearization explains; `excerpt` ends with it.
    NotLinearizable { failing_at: usize, events: usize, excerpt: Vec<Event> },
}

impl std::fmt::Display for CheckError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckError::Malformed(why) => write!(f, "malformed history: {why}"),
            CheckError::NotLinearizable { failing_at, events, excerpt } => {
                writeln!(
                    f,
                    "not linearizable: the first {} of its {events} events have no \
                     linearization; the events up to there:",
                    failing_at + 1
                )?;
                for e in excerpt {
                    writeln!(f, "  {:>7} ms  process {:>4}  {:?}", e.at_ms, e.process, e.step)?;
                }
                Ok(())
            }
        }
    }
}

/// The events of `key`, in order.
pub fn of_key(events: &[Event], key: Key) -> Vec<Event> {
    events.iter().filter(|e| e.key == key).cloned().collect()
}

/// Checks one key's events (all of the same key, in recorded order).
pub fn check_key(events: &[Event]) -> Result<(), CheckError> {
    let kept_at = reduce(events)?;
    let kept: Vec<Event> = kept_at.iter().map(|&i| events[i].clone()).collect();
    if linearizable(&kept, kept.len())? {
        return Ok(());
    }
    // Linearizability of prefixes is monotone (a longer prefix only adds constraints), so the
    // shortest failing prefix is found by bisection; it ends at the event to look at.
    let (mut good, mut bad) = (0, kept.len());
    while bad - good > 1 {
        let mid = (good + bad) / 2;
        if linearizable(&kept, mid)? {
            good = mid;
        } else {
            bad = mid;
        }
    }
    let failing_at = kept_at[bad - 1];
    let excerpt = events[(failing_at + 1).saturating_sub(EXCERPT_EVENTS)..=failing_at].to_vec();
    Err(CheckError::NotLinearizable { failing_at, events: events.len(), excerpt })
}

/// Checks the well-formedness of `events` and drops the indeterminate operations that cannot
/// change the verdict (see the module's comment); returns the indices of the events kept.
/// Indeterminate writes that were read stay, as an invocation with no completion.
fn reduce(events: &[Event]) -> Result<Vec<usize>, CheckError> {
    let malformed = |i: usize, why: &str| {
        Err(CheckError::Malformed(format!("event {i} ({:?}): {why}", events[i])))
    };
    let read_values: BTreeSet<&Value> = events
        .iter()
        .filter_map(|e| match &e.step {
            Step::Complete(Outcome::ReadOk(v)) => Some(v),
            _ => None,
        })
        .collect();
    // The open invocation of each process (index into `events`), and the retired processes.
    let mut open: std::collections::BTreeMap<u64, usize> = Default::default();
    let mut retired = BTreeSet::new();
    let mut drop = vec![false; events.len()];
    for (i, e) in events.iter().enumerate() {
        if retired.contains(&e.process) {
            return malformed(i, "a process went on after an indeterminate write");
        }
        match &e.step {
            Step::Invoke(_) => {
                if open.insert(e.process, i).is_some() {
                    return malformed(i, "a second invocation before the first completed");
                }
            }
            Step::Complete(outcome) => {
                let Some(invoked) = open.remove(&e.process) else {
                    return malformed(i, "a completion with no invocation");
                };
                let Step::Invoke(op) = &events[invoked].step else { unreachable!() };
                match (op, outcome) {
                    (Op::Read, Outcome::ReadOk(_)) | (Op::Write(_), Outcome::WriteOk) => {}
                    (Op::Read, Outcome::Indeterminate(_)) => {
                        drop[invoked] = true;
                        drop[i] = true;
                    }
                    (Op::Write(v), Outcome::Indeterminate(_)) => {
                        retired.insert(e.process);
                        drop[i] = true;
                        drop[invoked] = !read_values.contains(v);
                    }
                    _ => return malformed(i, "the completion does not match the operation"),
                }
            }
        }
    }
    Ok((0..events.len()).filter(|&i| !drop[i]).collect())
}

/// Whether the first `len` of `kept` have a linearization; an invocation whose completion is not
/// among them is in flight.
fn linearizable(kept: &[Event], len: usize) -> Result<bool, CheckError> {
    let mut tester = LinearizabilityTester::new(Register(Value::new()));
    for e in &kept[..len] {
        let fed = match &e.step {
            Step::Invoke(Op::Read) => tester.on_invoke(e.process, RegisterOp::Read),
            Step::Invoke(Op::Write(v)) => tester.on_invoke(e.process, RegisterOp::Write(v.clone())),
            Step::Complete(Outcome::ReadOk(v)) => {
                tester.on_return(e.process, RegisterRet::ReadOk(v.clone()))
            }
            Step::Complete(Outcome::WriteOk) => tester.on_return(e.process, RegisterRet::WriteOk),
            Step::Complete(Outcome::Indeterminate(_)) => {
                unreachable!("reduce drops indeterminate completions")
            }
        };
        if let Err(why) = fed {
            return Err(CheckError::Malformed(why));
        }
    }
    Ok(tester.is_consistent())
}

/// `events` (one key's) with one read made stale, if the history allows it: the earliest
/// acknowledged read R that follows, in real time, two acknowledged writes W0 and W1 (W0
/// completed before W1 was invoked, W1 completed before R was invoked) is made to return W0's
/// value. No linearization explains that: W1 lies between W0 and R, and values are unique.
/// Returns the changed history and a line saying what changed.
pub fn with_a_stale_read(events: &[Event]) -> Option<(Vec<Event>, String)> {
    // (invoked, completed, value) of every acknowledged write.
    let mut writes = Vec::new();
    let mut invoked_at = std::collections::BTreeMap::new();
    for (i, e) in events.iter().enumerate() {
        match &e.step {
            Step::Invoke(op) => {
                invoked_at.insert(e.process, (i, op.clone()));
            }
            Step::Complete(Outcome::WriteOk) => {
                let (at, op) = &invoked_at[&e.process];
                let Op::Write(v) = op else { return None };
                writes.push((*at, i, v.clone()));
            }
            Step::Complete(Outcome::ReadOk(read)) => {
                let (read_invoked, _) = invoked_at[&e.process];
                let before: Vec<_> = writes.iter().filter(|w| w.1 < read_invoked).collect();
                let stale =
                    before.iter().find(|w0| &w0.2 != read && before.iter().any(|w1| w0.1 < w1.0));
                if let Some(w0) = stale {
                    let mut changed = events.to_vec();
                    changed[i].step = Step::Complete(Outcome::ReadOk(w0.2.clone()));
                    let line = format!(
                        "event {i}: the read of process {} returns {:?} instead of {read:?}",
                        e.process, w0.2
                    );
                    return Some((changed, line));
                }
            }
            Step::Complete(Outcome::Indeterminate(_)) => {}
        }
    }
    None
}
