//! Open files: a node holds one log file open per loaded tenant that has written, so the
//! store's loaded-tenant cap (`StoreConfig::loaded_tenants_max`) must fit under the process's
//! open-file limit, with room for everything else.

/// File descriptors a node keeps for all but its tenants' logs: its sockets, the registry's
/// files, and the files opened for a moment by checkpoints, snapshots and reads on the blocking
/// pool's threads.
pub const FILES_RESERVED: u64 = 2048;

/// The most the soft open-file limit is raised to when the hard limit is unbounded.
const FILES_LIMIT_MAX: u64 = 1 << 20;

/// Raises the process's soft open-file limit (`RLIMIT_NOFILE`) to its hard limit, then returns
/// the loaded-tenant cap that fits under it ([`fitted`]): `wanted`, or less, which is logged.
pub fn fit_loaded_tenants(wanted: usize) -> usize {
    let limit = raise_open_file_limit();
    let cap = fitted(wanted, limit);
    if cap < wanted {
        tracing::warn!(
            open_file_limit = limit,
            loaded_tenants_max = wanted,
            loaded_tenants_max_used = cap,
            reserved = FILES_RESERVED,
            "the open-file limit is too low for loaded_tenants_max; fewer tenants are kept loaded (raise LimitNOFILE)"
        );
    } else {
        tracing::info!(open_file_limit = limit, loaded_tenants_max = cap, "open files fit");
    }
    cap
}

/// The loaded-tenant cap that leaves [`FILES_RESERVED`] descriptors under `limit`: `wanted` if
/// it fits, else what does (half the limit when the limit is below twice the reserve), at
/// least 1.
pub fn fitted(wanted: usize, limit: u64) -> usize {
    let room = if limit > 2 * FILES_RESERVED { limit - FILES_RESERVED } else { limit / 2 };
    wanted.min(usize::try_from(room).unwrap_or(usize::MAX)).max(1)
}

/// The soft open-file limit after raising it as far as the hard limit allows.
fn raise_open_file_limit() -> u64 {
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

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the cap is kept when it fits, cut to leave the reserve when it does not, and never 0.
    #[test]
    fn the_cap_leaves_the_reserve_under_the_limit() {
        assert_eq!(fitted(8192, 65_536), 8192);
        assert_eq!(fitted(8192, 8192 + FILES_RESERVED), 8192);
        assert_eq!(fitted(8192, 8192), 8192 - FILES_RESERVED as usize);
        assert_eq!(fitted(8192, 1024), 512);
        assert_eq!(fitted(8192, 1), 1);
        assert_eq!(fitted(8192, u64::MAX), 8192);
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
