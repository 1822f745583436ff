//! The trace of one run: every event, stamped with simulated time, folded into a digest.
//!
//! Two runs of one seed must fold the same events in the same order, so the digest is the
//! determinism check. Events come in two weights: [`Trace::event`] lines are what a reader of a
//! replay wants (faults, client operations, elections); [`Trace::detail`] lines (every message)
//! are folded in too but printed only at the highest verbosity.

use std::fmt::Display;
use std::sync::Mutex;

use tokio::time::Instant;
use xxhash_rust::xxh3::Xxh3;

/// How much of the trace is printed while the run goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    Quiet,
    Events,
    Messages,
}

pub struct Trace {
    start: Instant,
    verbosity: Verbosity,
    inner: Mutex<Inner>,
}

struct Inner {
    digest: Xxh3,
    events: u64,
}

impl Trace {
    pub fn new(verbosity: Verbosity) -> Trace {
        Trace {
            start: Instant::now(),
            verbosity,
            inner: Mutex::new(Inner { digest: Xxh3::new(), events: 0 }),
        }
    }

    /// Simulated milliseconds since the run began.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn fold(&self, line: &str, print: bool) {
        let now = self.now_ms();
        {
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            inner.digest.update(&now.to_le_bytes());
            inner.digest.update(line.as_bytes());
            inner.events += 1;
        }
        if print {
            println!("{:>6}.{:03}s  {line}", now / 1000, now % 1000);
        }
    }

    /// A readable event: printed when replaying a seed.
    pub fn event(&self, what: impl Display) {
        let print = self.verbosity >= Verbosity::Events;
        self.fold(&what.to_string(), print);
    }

    /// A message-level event: folded into the digest, printed only at `Messages` verbosity.
    pub fn detail(&self, what: impl Display) {
        let print = self.verbosity >= Verbosity::Messages;
        self.fold(&what.to_string(), print);
    }

    /// The digest of every event so far, and how many there were.
    pub fn digest(&self) -> (u64, u64) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        (inner.digest.digest(), inner.events)
    }

    pub fn verbosity(&self) -> Verbosity {
        self.verbosity
    }
}
