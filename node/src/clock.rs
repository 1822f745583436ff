//! Wall-clock time, behind a seam. The store's [`crate::store::Clock`] is monotonic and measures
//! every duration (idleness, gossip silence, request latency, handoff pacing); limits that turn with the UTC day and records stamped for operators need the
//! calendar, and read it only through [`WallClock`].

use std::time::{SystemTime, UNIX_EPOCH};

use proto::calendar::DAY_S;

pub trait WallClock: Send + Sync {
    /// Milliseconds since the Unix epoch, UTC.
    fn unix_ms(&self) -> u64;
}

/// [`WallClock`] over the system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemWallClock;

impl WallClock for SystemWallClock {
    fn unix_ms(&self) -> u64 {
        // A clock before 1970 is a broken machine; count it as the epoch rather than fail requests.
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
    }
}

pub const DAY_MS: u64 = DAY_S * 1000;

/// The UTC day number (days since the epoch) of a time.
pub fn utc_day(unix_ms: u64) -> u64 {
    unix_ms / DAY_MS
}

/// Seconds from `unix_ms` until the next UTC midnight, at least 1.
pub fn seconds_to_next_utc_day(unix_ms: u64) -> u64 {
    let next = (utc_day(unix_ms) + 1) * DAY_MS;
    (next - unix_ms).div_ceil(1000).max(1)
}
