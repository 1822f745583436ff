//! Wall-clock time, behind a seam. The store's [`crate::store::Clock`] is monotonic and measures
//! every duration (idleness, gossip silence, request latency, handoff pacing); limits that turn with the UTC day and records stamped for operators need the
//! calendar, and read it only through [`WallClock`].

use std::time::{SystemTime, UNIX_EPOCH};

use proto::calendar::{civil_from_days, DAY_S};

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

/// A time as RFC 3339 in UTC with whole seconds, e.g. `2026-02-12T13:05:00Z` (the shape of the
/// seeds' `last_active`).
pub fn rfc3339_utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = i64::try_from(secs / DAY_S).unwrap_or(i64::MAX);
    let (year, month, day) = civil_from_days(days);
    let s = secs % DAY_S;
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", s / 3600, s % 3600 / 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: RFC 3339 dates are right at the epoch, across a leap day and at a day's last second.
    #[test]
    fn rfc3339() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_770_901_500_999), "2026-02-12T13:05:00Z");
        assert_eq!(rfc3339_utc(4_102_444_799_000), "2099-12-31T23:59:59Z");
    }
}
