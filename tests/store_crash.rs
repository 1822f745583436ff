//! Black-box crash test of the tenant store: the `store-writer` test binary is killed with SIGKILL at a
//! random moment, over and over on the same data directory, and after every kill the store must
//! hold every write the writer acknowledged, byte for byte.
//!
//! The writer (`tests/support/crash_writer.rs`) makes this checkable: each slot (phext, coordinate)
//! is written by one thread, one write at a time, with content derived from (seed, slot, n). So
//! after a kill each slot holds either the model's state (every acknowledged write) or that
//! state plus the one write that was in flight: fsynced, but killed before its ack was printed.
//! Anything else (a lost acknowledged write, a torn or doubled one) fails the test.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[allow(dead_code)] // the writer itself runs in the store-writer binary
#[path = "support/crash_writer.rs"]
mod crash_writer;

use crash_writer::{crash_slot, crash_step, crash_step_of, CrashStep, CRASH_COORDS, CRASH_SLOTS};
use node::store::{RealVfs, Store, StoreConfig, SystemClock};
use proto::{PhextName, SqRequest};
use rand::{Rng, SeedableRng};

/// Kills per test run; each restarts the writer on the state the last kill left.
const RUNS: usize = 24;
/// The writer's content seed.
const SEED: u64 = 0x5EED_0001;
const TENANT: &str = "crash-test";
/// The kill comes this long after the first ack of a run, in milliseconds: long enough for
/// batches and checkpoints to be under way, short enough to hit the writer's start-up too.
const KILL_DELAY_MS: std::ops::Range<u64> = 20..300;
/// How long a run may take to print its first ack (start-up plus recovery) before the test fails.
const FIRST_ACK_WAIT_MAX: Duration = Duration::from_secs(60);

#[derive(Clone, Default)]
struct SlotModel {
    /// Writes acknowledged (or found on disk) so far.
    n: u64,
    scroll: String,
}

fn writer(dir: &Path, stderr: File) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_store-writer"))
        .arg("--data")
        .arg(dir)
        .args(["--tenant", TENANT, "--seed", &SEED.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr))
        .spawn()
        .expect("store-writer starts")
}

/// Runs the writer once, kills it `delay_ms` after its first ack, and returns every complete
/// line it printed.
fn run_and_kill(dir: &Path, run: usize, delay_ms: u64) -> Vec<String> {
    let stderr_path = dir.join(format!("writer-{run}.stderr"));
    let mut child = writer(&dir.join("data"), File::create(&stderr_path).expect("stderr file"));
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        // A line without its newline was cut by the kill; it was never a whole ack.
        while stdout.read_line(&mut line).is_ok_and(|n| n > 0) && line.ends_with('\n') {
            if tx.send(line.trim_end().to_string()).is_err() {
                break;
            }
            line.clear();
        }
    });
    let stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let mut lines = Vec::new();
    match rx.recv_timeout(FIRST_ACK_WAIT_MAX) {
        Ok(line) => lines.push(line),
        Err(e) => {
            let _ = child.kill();
            panic!("run {run}: no ack from the writer ({e}); stderr:\n{}", stderr());
        }
    }
    let deadline = Instant::now() + Duration::from_millis(delay_ms);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(RecvTimeoutError::Timeout) => break,
            Err(RecvTimeoutError::Disconnected) => {
                panic!("run {run}: the writer stopped by itself; stderr:\n{}", stderr())
            }
        }
    }
    // SAFETY: kill(2) on the pid of a child we have not reaped yet.
    let killed = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
    assert_eq!(killed, 0, "run {run}: kill failed");
    let status = child.wait().expect("reap the writer");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "run {run}: the writer ended otherwise; stderr:\n{}",
        stderr()
    );
    reader.join().expect("stdout reader");
    lines.extend(rx.try_iter());
    lines
}

fn slot_of(phext: &str, coord: &str) -> usize {
    (0..CRASH_SLOTS)
        .find(|&s| {
            let (p, c) = crash_slot(s);
            p.as_str() == phext && c.to_string() == coord
        })
        .unwrap_or_else(|| panic!("ack for an unknown slot {phext} {coord}"))
}

/// Applies one `ack <phext> <coord> <op> <n> <checksum>` line to the model, checking that it is
/// the slot's next write and that its content is the one the step function gives.
fn apply_ack(model: &mut [SlotModel], line: &str) {
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert!(fields.len() == 6 && fields[0] == "ack", "not an ack line: {line:?}");
    let slot = slot_of(fields[1], fields[2]);
    let n: u64 = fields[4].parse().expect("ack step number");
    assert_eq!(n, model[slot].n + 1, "ack out of sequence: {line}");
    let step = crash_step(SEED, slot, n);
    assert_eq!(step.op.as_str(), fields[3], "{line}");
    assert_eq!(proto::doc::checksum(step.text.as_bytes()), fields[5], "{line}");
    model[slot].scroll = step.apply(&model[slot].scroll);
    model[slot].n = n;
}

/// Opens the store as a restarted node would and checks every slot against the model. A slot
/// one write ahead of the model adopts it. Returns how many slots were ahead.
fn verify(data: &Path, model: &mut [SlotModel], run: usize) -> usize {
    let config = StoreConfig { data_dir: data.to_path_buf(), ..StoreConfig::default() };
    let store = Store::open(config, Arc::new(RealVfs), Arc::new(SystemClock::new()))
        .expect("store opens after a kill");
    let mut ahead = 0;
    for (slot, m) in model.iter_mut().enumerate() {
        let (p, c) = crash_slot(slot);
        let found = store.execute(TENANT, u64::MAX, &SqRequest::Select { p, c }).expect("select");
        let found = String::from_utf8(found.body).expect("UTF-8 scroll");
        if found == m.scroll {
            continue;
        }
        let next: CrashStep = crash_step(SEED, slot, m.n + 1);
        let next_scroll = next.apply(&m.scroll);
        assert!(
            found == next_scroll,
            "run {run}, slot {slot}: {} bytes from step {:?} on disk; acknowledged: {} bytes at step {}",
            found.len(),
            crash_step_of(&found),
            m.scroll.len(),
            m.n
        );
        m.scroll = next_scroll;
        m.n += 1;
        ahead += 1;
    }
    for phext in crash_writer::CRASH_PHEXTS {
        let toc = store
            .execute(
                TENANT,
                u64::MAX,
                &SqRequest::Toc { p: PhextName::parse(phext).expect("name") },
            )
            .expect("toc");
        for line in String::from_utf8_lossy(&toc.body).lines().filter(|l| l.starts_with("* ")) {
            let coord = line[2..].split(": ").next().unwrap_or("");
            assert!(CRASH_COORDS.contains(&coord), "run {run}: stray scroll {coord} in {phext}");
        }
    }
    ahead
}

// Goal: across many SIGKILLs at random moments (mid-batch, mid-checkpoint), no
// acknowledged write is ever lost, torn or applied twice, and each restart resumes cleanly.
#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED);
    let mut model = vec![SlotModel::default(); CRASH_SLOTS];
    let (mut acks, mut ahead) = (0, 0);
    for run in 0..RUNS {
        let delay_ms = rng.gen_range(KILL_DELAY_MS);
        let lines = run_and_kill(dir.path(), run, delay_ms);
        acks += lines.len();
        for line in &lines {
            apply_ack(&mut model, line);
        }
        ahead += verify(&dir.path().join("data"), &mut model, run);
    }
    println!(
        "{RUNS} kills, {acks} acknowledged writes, {ahead} unacknowledged writes found durable"
    );
    assert!(acks >= RUNS, "the writer made progress in every run");
}
