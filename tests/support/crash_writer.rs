//! The writer behind the `store-writer` test binary, which the black-box crash test
//! (`tests/store_crash.rs`) runs and kills with SIGKILL over and over on the same data directory.
//! It is test support, kept out of the product: the test includes this file for the expected
//! states, the binary for the writer.
//!
//! It makes the store's promise checkable from outside: every write's content is unique and
//! derived from `(seed, slot, n)`, where a slot is one (phext, coordinate) and `n` counts the
//! writes to it. Each slot is written by one thread only, one write at a time, so after a kill
//! the slot holds either the state after its last acknowledged write or the state after the one
//! write that was in flight. The writer prints `ack <phext> <coord> <op> <n> <checksum of text>`
//! only after `Store::execute` returned Ok, and resumes each slot from what the store holds.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use proto::{Coordinate, PhextName, SqRequest};

use node::store::{RealVfs, Store, StoreConfig, StoreError, SystemClock};

/// The phexts the writer writes.
pub const CRASH_PHEXTS: [&str; 3] = ["crash-a", "crash-b", "crash-c"];
/// The coordinates it writes in each phext: spread over several dimensions so breaks vary.
pub const CRASH_COORDS: [&str; 4] =
    ["1.1.1/1.1.1/1.1.1", "1.1.1/1.1.1/1.1.7", "1.1.2/1.1.1/1.1.1", "3.1.1/2.1.1/1.4.2"];
/// One slot per (phext, coordinate).
pub const CRASH_SLOTS: usize = CRASH_PHEXTS.len() * CRASH_COORDS.len();

/// Writer threads; slot `s` belongs to thread `s % WRITER_THREADS`. Several threads make group
/// commit batch more than one record.
const WRITER_THREADS: usize = 4;
/// The writer's checkpoint threshold, in bytes: small, so a run of a few hundred milliseconds
/// checkpoints several times and kills land inside checkpoints too.
const CRASH_CHECKPOINT_WAL_BYTES: u64 = 256 * 1024;
/// One write in this many is large (64 to 192 KiB), to move the log past the threshold quickly.
const LARGE_EVERY: u64 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashOp {
    Insert,
    Update,
}

impl CrashOp {
    pub fn as_str(self) -> &'static str {
        match self {
            CrashOp::Insert => "insert",
            CrashOp::Update => "update",
        }
    }
}

/// The `n`th write (from 1) to a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashStep {
    pub op: CrashOp,
    pub text: String,
}

impl CrashStep {
    /// The slot's scroll after this step, given the scroll before it.
    pub fn apply(&self, before: &str) -> String {
        match self.op {
            CrashOp::Insert => format!("{before}{}", self.text),
            CrashOp::Update => self.text.clone(),
        }
    }
}

/// The phext and coordinate of a slot.
pub fn crash_slot(slot: usize) -> (PhextName, Coordinate) {
    assert!(slot < CRASH_SLOTS, "slot {slot} out of range");
    let name = PhextName::parse(CRASH_PHEXTS[slot / CRASH_COORDS.len()])
        .expect("crash phext names are valid");
    let c = Coordinate::parse(CRASH_COORDS[slot % CRASH_COORDS.len()])
        .expect("crash coordinates are valid");
    (name, c)
}

/// splitmix64: a tiny, well-mixed generator, so the content depends on nothing but its inputs.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The `n`th write to `slot` for `seed`. Its text starts `#<n>:` and holds no other `#`, so the
/// step that produced a scroll can be read back from it ([`crash_step_of`]).
// `is_multiple_of` is newer than the workspace's rust-version (1.85).
#[allow(clippy::manual_is_multiple_of)]
pub fn crash_step(seed: u64, slot: usize, n: u64) -> CrashStep {
    assert!(n >= 1, "steps count from 1");
    let mut state = mix(seed ^ mix(slot as u64) ^ mix(n).rotate_left(17));
    let op = if state % 3 == 0 { CrashOp::Insert } else { CrashOp::Update };
    state = mix(state);
    let len = if n % LARGE_EVERY == 0 {
        64 * 1024 + (state % (128 * 1024)) as usize
    } else {
        16 + (state % 240) as usize
    };
    const ALPHABET: [char; 30] = [
        'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j', 'k', 'l', 'm', 'n', 'o', 'p', 'q', 'r',
        's', 't', 'u', 'v', 'w', 'x', 'y', 'z', ' ', '\n', 'é', '✓',
    ];
    let mut text = format!("#{n}:{slot}:");
    while text.len() < len {
        state = mix(state);
        text.push(ALPHABET[(state % ALPHABET.len() as u64) as usize]);
    }
    text.push(';');
    CrashStep { op, text }
}

/// The step that produced `scroll` (0 for an empty one), or `None` if no step could have.
pub fn crash_step_of(scroll: &str) -> Option<u64> {
    if scroll.is_empty() {
        return Some(0);
    }
    let last = &scroll[scroll.rfind('#')? + 1..];
    last.split(':').next()?.parse().ok()
}

/// Opens the store at `data_dir` and writes to `tenant` until killed, printing one `ack` line
/// per acknowledged write. Returns only on failure.
pub fn crash_writer(data_dir: &Path, tenant: &str, seed: u64) -> anyhow::Result<()> {
    let config = StoreConfig {
        data_dir: data_dir.to_path_buf(),
        checkpoint_wal_bytes: CRASH_CHECKPOINT_WAL_BYTES,
        ..StoreConfig::default()
    };
    let store = Store::open(config, Arc::new(RealVfs), Arc::new(SystemClock::new()))?;
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let threads: Vec<_> = (0..WRITER_THREADS)
            .map(|t| {
                let store = &store;
                let slots: Vec<usize> = (t..CRASH_SLOTS).step_by(WRITER_THREADS).collect();
                scope.spawn(move || write_slots(store, tenant, seed, &slots))
            })
            .collect();
        for thread in threads {
            match thread.join() {
                Ok(result) => result?,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        Ok(())
    })
}

/// Writes the next step of each of `slots` in turn, forever.
fn write_slots(store: &Store, tenant: &str, seed: u64, slots: &[usize]) -> Result<(), StoreError> {
    let mut done = Vec::with_capacity(slots.len());
    for &slot in slots {
        let (p, c) = crash_slot(slot);
        let scroll = store.execute(tenant, u64::MAX, &SqRequest::Select { p, c })?.body;
        let scroll = String::from_utf8_lossy(&scroll);
        let n = crash_step_of(&scroll).ok_or_else(|| {
            StoreError::InvalidRequest(format!("slot {slot} holds a scroll no step wrote"))
        })?;
        done.push(n);
    }
    let stdout_err = |e: io::Error| StoreError::Io {
        what: "print ack",
        path: PathBuf::from("<stdout>"),
        source: Arc::new(e),
    };
    loop {
        for (i, &slot) in slots.iter().enumerate() {
            let n = done[i] + 1;
            let step = crash_step(seed, slot, n);
            let (p, c) = crash_slot(slot);
            let request = match step.op {
                CrashOp::Insert => SqRequest::Insert { p: p.clone(), c, text: step.text.clone() },
                CrashOp::Update => SqRequest::Update { p: p.clone(), c, text: step.text.clone() },
            };
            store.execute(tenant, u64::MAX, &request)?;
            let checksum = proto::doc::checksum(step.text.as_bytes());
            let mut out = io::stdout().lock();
            writeln!(out, "ack {p} {c} {} {n} {checksum}", step.op.as_str()).map_err(stdout_err)?;
            out.flush().map_err(stdout_err)?;
            done[i] = n;
        }
    }
}
