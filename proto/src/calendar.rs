//! Calendar arithmetic: the one conversion from a day count to a date, used for RFC 3339 stamps
//! in the gateway's admin answers and certificate validity in transport. Pure arithmetic; the
//! clocks live with their callers.

/// Seconds in a UTC day (no leap seconds, as Unix time counts).
pub const DAY_S: u64 = 24 * 60 * 60;

/// The proleptic Gregorian (year, month, day) of a count of days since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`); negative counts are days before the epoch.
pub fn civil_from_days(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
    (year, month, day)
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
    use super::{civil_from_days, rfc3339_utc};

    // Goal: dates are right at the epoch, before it, across leap days (2000 is one, 1900 and
    // 2100 are not) and at a year's end.
    #[test]
    fn known_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        assert_eq!(civil_from_days(-25_509), (1900, 2, 28));
        assert_eq!(civil_from_days(-25_508), (1900, 3, 1));
        assert_eq!(civil_from_days(47_540), (2100, 2, 28));
        assert_eq!(civil_from_days(47_541), (2100, 3, 1));
        assert_eq!(civil_from_days(47_481), (2099, 12, 31));
    }

    // Goal: RFC 3339 dates are right at the epoch, across a leap day and at a day's last second.
    #[test]
    fn rfc3339() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_770_901_500_999), "2026-02-12T13:05:00Z");
        assert_eq!(rfc3339_utc(4_102_444_799_000), "2099-12-31T23:59:59Z");
    }
}
