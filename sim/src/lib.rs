//! sim owns the deterministic simulation of a whole sq-cloud cluster: node processes, gateways,
//! clients and an operator, on a simulated network, disk and clock, all driven by one seed.
//!
//! The code under test is the real one, entered through its seams: `node::NodeParts` opened on
//! `node::Seams` (our [`net::Port`] for `transport::Caller`, our [`disk::SimDisk`] behind the
//! store's `Vfs` and the registry's `disk::Fs`, our [`clock`]s), the real openraft driven through
//! raft-registry's network and storage, the gateway's routing through `gateway::api::serve` and
//! `gateway::admin::apply_op`. Everything runs on one thread: a paused current-thread tokio
//! runtime whose `select!` is seeded, store work as tasks of that thread whose effects land
//! after a simulated disk latency (`node::blocking`), openraft's election
//! timeouts from a seeded generator (`raft_registry::runtime`). So a seed replays one run, event
//! for event, and the trace digest proves it.
//!
//! sim must not know node internals beyond those seams: it never reaches into the store, the
//! registry's files or the service's state to make a check pass, only to observe (the registry
//! state each node applies, which node answered). It must not fake what it tests: no stand-in
//! for openraft, the store, placement or the gateway's routing.
//!
//! Map of the crate:
//! - [`scenario`]: one run — formation, chaos, heal, convergence, final check;
//! - [`cluster`], [`net`], [`disk`] + [`adapters`], [`clock`]: the simulated machines;
//! - [`workload`], [`operator`], [`faults`]: the actors;
//! - [`model`], [`monitor`]: the expected state and the invariants;
//! - [`rng`], [`trace`]: the seed and the replayable record of a run.

pub mod adapters;
pub mod clock;
pub mod cluster;
pub mod disk;
pub mod faults;
pub mod model;
pub mod monitor;
pub mod net;
pub mod operator;
pub mod rng;
pub mod scenario;
pub mod trace;
pub mod workload;
pub mod world;

use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

pub use monitor::{Invariant, Violation};
pub use trace::Verbosity;

use crate::trace::Trace;
use crate::world::Stats;

/// How one run goes.
#[derive(Debug, Clone)]
pub struct Options {
    /// Simulated time of clients, faults and admin operations before the faults heal.
    pub chaos: Duration,
    /// Inject faults (off only to test the simulator itself).
    pub faults: bool,
    /// R, set once the cluster has formed and before its tenants are added (1: no replication).
    pub replicas: u8,
    pub verbosity: Verbosity,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            chaos: Duration::from_secs(40),
            faults: true,
            replicas: 1,
            verbosity: Verbosity::Quiet,
        }
    }
}

/// The result of one seed.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub seed: u64,
    pub violation: Option<Violation>,
    /// Digest of the whole trace, and its number of events.
    pub digest: u64,
    pub events: u64,
    /// Simulated time the run covered.
    pub simulated: Duration,
    /// Real time it took.
    pub wall: Duration,
    pub stats: Stats,
}

thread_local! {
    /// The message of the first panic of the run going on this thread.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
    /// True while a run goes on this thread; other panics are reported as usual.
    static IN_RUN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Panics inside a run are findings, reported with their seed: keep the first one's message,
/// print nothing.
fn capture_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let usual = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_RUN.with(|r| r.get()) {
                return usual(info);
            }
            let at =
                info.location().map_or(String::new(), |l| format!(" at {}:{}", l.file(), l.line()));
            let what = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            LAST_PANIC.with(|p| {
                p.borrow_mut().get_or_insert(format!("{what}{at}"));
            });
        }));
    });
}

/// Runs one seed on this thread and reports what happened.
pub fn run_seed(seed: u64, options: &Options) -> Outcome {
    capture_panics();
    LAST_PANIC.with(|p| p.borrow_mut().take());
    let started = Instant::now();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()))
        .unhandled_panic(tokio::runtime::UnhandledPanic::ShutdownRuntime)
        .build();
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            return outcome(
                seed,
                started,
                Some(Violation::new(Invariant::Panic, format!("no runtime: {e}"))),
                None,
                None,
            )
        }
    };
    raft_registry::runtime::seed_thread_rng(seed.rotate_left(17) ^ 0xA5A5_A5A5);
    disk::seed_latency(Some(rng::Rng::new(seed.rotate_left(29) ^ 0x0D15_C0DE)));
    node::blocking::run_inline_on_this_thread(Some(Box::new(|| {
        Duration::from_millis(disk::next_work_ms())
    })));
    let _ = disk::take_debt_ms();
    let trace = {
        let _in_runtime = runtime.enter();
        Arc::new(Trace::new(options.verbosity))
    };
    IN_RUN.with(|r| r.set(true));
    let run = std::panic::catch_unwind(AssertUnwindSafe(|| {
        runtime.block_on(scenario::run(seed, options, trace.clone()))
    }));
    IN_RUN.with(|r| r.set(false));
    let (stats, violation, simulated) = {
        let _in_runtime = runtime.enter();
        let simulated = Duration::from_millis(trace.now_ms());
        match run {
            Ok((stats, violation)) => (Some(stats), violation, simulated),
            Err(_) => {
                let message =
                    LAST_PANIC.with(|p| p.borrow_mut().take()).unwrap_or_else(|| "a panic".into());
                (None, Some(Violation::new(Invariant::Panic, message)), simulated)
            }
        }
    };
    drop(runtime);
    node::blocking::run_inline_on_this_thread(None);
    disk::seed_latency(None);
    let mut out = outcome(seed, started, violation, Some(&trace), stats);
    out.simulated = simulated;
    out
}

fn outcome(
    seed: u64,
    started: Instant,
    violation: Option<Violation>,
    trace: Option<&Trace>,
    stats: Option<Stats>,
) -> Outcome {
    let (digest, events) = trace.map_or((0, 0), Trace::digest);
    Outcome {
        seed,
        violation,
        digest,
        events,
        simulated: Duration::ZERO,
        wall: started.elapsed(),
        stats: stats.unwrap_or_default(),
    }
}
