//! Open files: a node holds one log file open per loaded tenant that has written, so the
//! store's loaded-tenant cap (`StoreConfig::loaded_tenants_max`) must fit under the process's
//! open-file limit, with room for everything else.

/// File descriptors a node keeps for all but its tenants' logs: its sockets, the registry's
/// files, and the files opened for a moment by checkpoints, snapshots and reads on the blocking
/// pool's threads.
pub const FILES_RESERVED: u64 = 2048;

/// Raises the process's soft open-file limit (`RLIMIT_NOFILE`) to its hard limit, then returns
/// the loaded-tenant cap that fits under it with [`FILES_RESERVED`] to spare
/// (`telemetry::files::fitted`): `wanted`, or less, which is logged.
pub fn fit_loaded_tenants(wanted: usize) -> usize {
    let limit = telemetry::files::raise_open_file_limit();
    let cap = telemetry::files::fitted(wanted, limit, FILES_RESERVED);
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
