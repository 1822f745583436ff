//! Simulated clocks. Every machine has a calendar clock and a monotonic one, both driven by
//! tokio's paused clock plus the jumps the fault schedule makes.
//!
//! - [`Wall`] (`node::clock::WallClock`) jumps both ways, as NTP steps and bad RTCs do: daily
//!   limits see days turn early or twice.
//! - [`Mono`] (`node::store::Clock`) only jumps forward, as a machine paused and resumed does:
//!   tenants look idle, peers look silent. Each process start begins it at zero again.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::time::Instant;

/// Calendar time at which every run starts: 2026-03-01T00:00:00Z, in Unix milliseconds.
const WALL_START_UNIX_MS: u64 = 1_772_323_200_000;

/// One machine's clocks.
pub struct Clocks {
    start: Instant,
    /// Where in its first day the machine's calendar starts; close to midnight in some runs.
    wall_base_ms: u64,
    wall_offset_ms: AtomicI64,
    mono_jump_ms: AtomicU64,
}

impl Clocks {
    pub fn new(ms_into_day: u64) -> Arc<Clocks> {
        Arc::new(Clocks {
            start: Instant::now(),
            wall_base_ms: WALL_START_UNIX_MS + ms_into_day,
            wall_offset_ms: AtomicI64::new(0),
            mono_jump_ms: AtomicU64::new(0),
        })
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Steps the calendar clock by `delta_ms`, either way.
    pub fn jump_wall(&self, delta_ms: i64) {
        self.wall_offset_ms.fetch_add(delta_ms, Ordering::SeqCst);
    }

    /// Moves the monotonic clock forward by `delta_ms` at once.
    pub fn jump_mono(&self, delta_ms: u64) {
        self.mono_jump_ms.fetch_add(delta_ms, Ordering::SeqCst);
    }

    fn mono_ms(&self) -> u64 {
        self.elapsed_ms() + self.mono_jump_ms.load(Ordering::SeqCst)
    }

    pub fn unix_ms(&self) -> u64 {
        let base = (self.wall_base_ms + self.elapsed_ms()) as i64;
        (base + self.wall_offset_ms.load(Ordering::SeqCst)).max(0) as u64
    }
}

/// A machine's calendar clock.
pub struct Wall(pub Arc<Clocks>);

impl node::clock::WallClock for Wall {
    fn unix_ms(&self) -> u64 {
        self.0.unix_ms()
    }
}

/// One process's monotonic clock: zero when the process started.
pub struct Mono {
    machine: Arc<Clocks>,
    started_ms: u64,
}

impl Mono {
    pub fn new(machine: Arc<Clocks>) -> Mono {
        let started_ms = machine.mono_ms();
        Mono { machine, started_ms }
    }
}

impl node::store::Clock for Mono {
    fn now_ms(&self) -> u64 {
        self.machine.mono_ms() - self.started_ms
    }
}
