//! The process's open-file limit, raised the same way by nodes and gateways: a node holds a log
//! file open per loaded tenant that has written, a gateway a socket per client connection, and
//! each fits its own cap under the limit with [`fitted`].

/// The most the soft open-file limit is raised to when the hard limit is unbounded.
const FILES_LIMIT_MAX: u64 = 1 << 20;

/// Raises the process's soft open-file limit (`RLIMIT_NOFILE`) as far as its hard limit allows
/// (at most 2^20), and returns the soft limit then in force: `u64::MAX` if it cannot be read.
pub fn raise_open_file_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct it is given, which lives across the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return u64::MAX;
    }
    let target = limit.rlim_max.min(FILES_LIMIT_MAX);
    if limit.rlim_cur < target {
        let raised = libc::rlimit { rlim_cur: target, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads the struct it is given, which lives across the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return target;
        }
    }
    limit.rlim_cur
}

/// The cap on what holds a descriptor each (loaded tenants, client connections) that leaves
/// `reserved` descriptors under `limit`: `wanted` if it fits, else what does (half the limit
/// when the limit is below twice the reserve), at least 1.
pub fn fitted(wanted: usize, limit: u64, reserved: u64) -> usize {
    let room = if limit > 2 * reserved { limit - reserved } else { limit / 2 };
    wanted.min(usize::try_from(room).unwrap_or(usize::MAX)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the cap is kept when it fits, cut to leave the reserve when it does not, and never 0.
    #[test]
    fn the_cap_leaves_the_reserve_under_the_limit() {
        assert_eq!(fitted(8192, 65_536, 2048), 8192);
        assert_eq!(fitted(8192, 8192 + 2048, 2048), 8192);
        assert_eq!(fitted(8192, 8192, 2048), 8192 - 2048);
        assert_eq!(fitted(8192, 8192, 1024), 8192 - 1024);
        assert_eq!(fitted(8192, 1024, 2048), 512);
        assert_eq!(fitted(8192, 1, 2048), 1);
        assert_eq!(fitted(8192, u64::MAX, 2048), 8192);
    }

    // Goal: after the raise, the soft limit is at least what it was, and what is reported.
    #[test]
    fn the_soft_limit_is_raised_not_lowered() {
        let mut before = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: as in raise_open_file_limit.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut before) }, 0);
        let reported = raise_open_file_limit();
        let mut after = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut after) }, 0);
        assert!(after.rlim_cur >= before.rlim_cur, "{} then {}", before.rlim_cur, after.rlim_cur);
        assert_eq!(reported, after.rlim_cur);
    }
}
