//! Log lines that anyone on the internet can cause, counted and written at most once per
//! interval: a flood of unauthenticated requests or refused connections must not become a
//! flood of log lines (disk, log shipping). The exact counts are in the metrics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// At most one line per event kind in this time: a few lines a minute say "this is happening,
/// this often" as well as thousands do.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Events of one kind since the last line written about them.
pub struct Tally {
    count: AtomicU64,
    next_line: Mutex<Option<Instant>>,
}

impl Tally {
    pub const fn new() -> Tally {
        Tally { count: AtomicU64::new(0), next_line: Mutex::new(None) }
    }

    /// Counts one event. Returns how many happened since the last line (this one included)
    /// when a line is due: the first event at once, then at most one per [`LOG_INTERVAL`].
    pub fn note(&self) -> Option<u64> {
        self.note_at(Instant::now())
    }

    fn note_at(&self, now: Instant) -> Option<u64> {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut next = self.next_line.lock().unwrap_or_else(PoisonError::into_inner);
        if next.is_some_and(|t| now < t) {
            return None;
        }
        *next = Some(now + LOG_INTERVAL);
        Some(self.count.swap(0, Ordering::Relaxed))
    }
}

impl Default for Tally {
    fn default() -> Self {
        Tally::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the first event is written at once, later ones within the interval are only
    // counted, and the next line carries every event since the last one.
    #[test]
    fn one_line_per_interval_with_the_count() {
        let tally = Tally::new();
        let t0 = Instant::now();
        assert_eq!(tally.note_at(t0), Some(1));
        for i in 1..1000 {
            assert_eq!(tally.note_at(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(tally.note_at(t0 + LOG_INTERVAL), Some(1000));
        assert_eq!(tally.note_at(t0 + LOG_INTERVAL), None);
        assert_eq!(tally.note_at(t0 + 2 * LOG_INTERVAL), Some(2));
    }
}
