//! Ctrl-C and SIGTERM for the synchronous supervisor: a flag the main loop polls.

use std::sync::atomic::{AtomicBool, Ordering};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

/// Installs the handlers and returns the flag they set.
pub fn install() -> anyhow::Result<&'static AtomicBool> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // The handler only stores to an atomic, which is safe in a signal context.
        let previous = unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
        if previous == libc::SIG_ERR {
            anyhow::bail!("cannot install the handler for signal {sig}");
        }
    }
    Ok(&STOP)
}
