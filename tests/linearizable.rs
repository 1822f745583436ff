//! Black-box: a Jepsen-style register test. Clients read (`select`) and write (`update`)
//! coordinates of a few tenants' phexts through the gateway of a `sq-cloud dev` cluster while a
//! nemesis kills, freezes, joins and drains nodes (with one copy of each tenant), and also wipes
//! them (with three copies); every invocation and completion is recorded
//! and each key (tenant, phext, coordinate) is checked as an independent register by
//! stateright's `LinearizabilityTester` (`jepsen::history`). An operation answered with an
//! error or not in time is indeterminate: it may or may not have taken effect.
//!
//! The schedule, the clients' operations and their values come from one seed, printed at the
//! start; `SQ_LINEARIZABLE_SEED` replays another. Timing is the machine's, so a replay makes
//! the same faults and choices, not the same interleaving.

mod common;
mod jepsen;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use common::DevCluster;
use jepsen::client::{self, Shared, Target};
use jepsen::history::{self, Event, Key, Op, Outcome, Recorder, Step};
use jepsen::nemesis::{self, Nemesis};

/// Tenants, phexts per tenant and coordinates per phext: 4 × 2 × 2 = 16 registers, spread over
/// the nodes by placement.
const TENANTS: usize = 4;
const PHEXTS: usize = 2;
const COORDS: [&str; 2] = ["1.1.1/1.1.1/1.1.1", "2.1.1/1.1.1/1.1.7"];

/// Clients per key: enough for concurrent operations, few enough that the search stays small.
const CLIENTS_PER_KEY: usize = 2;

/// The seed of a run when `SQ_LINEARIZABLE_SEED` does not name one.
const SEED_DEFAULT: u64 = 16;
const SEED_VAR: &str = "SQ_LINEARIZABLE_SEED";

/// Quiet time with clients running before the first fault and after the cluster healed.
const QUIET: Duration = Duration::from_secs(2);

/// Acknowledged reads and writes each key must have, so a run in which the cluster answered
/// almost nothing cannot pass.
const ACKNOWLEDGED_PER_KEY_MIN: usize = 20;

/// How long the final read of a key may take to be answered after the cluster healed.
const FINAL_READ_LIMIT: Duration = Duration::from_secs(30);

/// The checker's thread stack: its search recurses once per operation of a key.
const CHECK_STACK_BYTES: usize = 256 << 20;

// Goal: the single-copy cluster keeps every key linearizable through kills (SIGKILL, then a
// restart), freezes (SIGSTOP, SIGCONT), a join and a drain, twice; and the same history with
// one read made stale is refused, so the check can fail.
#[test]
fn registers_stay_linearizable_under_kill_pause_join_and_drain() {
    let seed = std::env::var(SEED_VAR).ok().and_then(|s| s.parse().ok()).unwrap_or(SEED_DEFAULT);
    eprintln!("linearizable: seed {seed} ({SEED_VAR}={seed} replays this schedule)");
    let mut rng = StdRng::seed_from_u64(seed);
    let faults = nemesis::schedule(&mut rng);
    eprintln!("linearizable: faults {faults:?}");
    check_run(seed, &mut rng, &faults, 1);
}

// Goal: with three copies of each tenant, every key stays linearizable through kills, freezes
// and wipes of a node's tenant store, each fault moving the primaries of the tenants it hits
// (failover, then the node back and its copies rebuilt), and a join and a drain, twice, each
// swapping one node of the sets it touches; the same refusal of a stale read holds.
#[test]
fn registers_stay_linearizable_with_three_copies_under_kill_pause_wipe_join_and_drain() {
    let seed = std::env::var(SEED_VAR).ok().and_then(|s| s.parse().ok()).unwrap_or(SEED_DEFAULT);
    eprintln!("linearizable (R = 3): seed {seed} ({SEED_VAR}={seed} replays this schedule)");
    let mut rng = StdRng::seed_from_u64(seed);
    let faults = nemesis::schedule_replicated(&mut rng);
    eprintln!("linearizable (R = 3): faults {faults:?}");
    check_run(seed, &mut rng, &faults, 3);
}

/// Runs the workload under `faults` on a cluster with `replicas` copies of each tenant, checks
/// the history, and asserts what both tests assert.
fn check_run(seed: u64, rng: &mut StdRng, faults: &[nemesis::Fault], replicas: u8) {
    let run = run_workload(rng, faults, replicas);
    let report = check_all(&run.events, &run.keys);
    eprintln!(
        "linearizable: seed {seed}; {} faults; {} client operations and {} final reads \
         ({} acknowledged, {} indeterminate) on {} keys in {:?}; checked in {:?}",
        run.faults.len(),
        run.operations,
        run.keys.len(),
        report.acknowledged,
        report.indeterminate,
        run.keys.len(),
        run.took,
        report.took,
    );
    eprintln!(
        "linearizable: indeterminate answers by kind {:?}; {} of them writes; a later read saw \
         these nonetheless (answer: count): {:?}",
        report.indeterminate_kinds, report.indeterminate_writes, report.indeterminate_writes_read
    );
    assert!(report.failures.is_empty(), "seed {seed}:\n{}", report.failures.join("\n"));
    for (key, n) in &report.acknowledged_by_key {
        assert!(*n >= ACKNOWLEDGED_PER_KEY_MIN, "seed {seed}: {key:?} had {n} acknowledged");
    }
    assert!(report.mutations_refused > 0, "seed {seed}: no key's history allowed a stale read");
    eprintln!(
        "linearizable: {} keys' histories with one read made stale were each refused",
        report.mutations_refused
    );
}

/// What a run of the workload left to check.
struct Run {
    events: Vec<Event>,
    keys: Vec<Key>,
    /// The nemesis's log, one line per fault done.
    faults: Vec<String>,
    /// The clients' operations (the final reads not counted).
    operations: usize,
    took: Duration,
}

/// Starts a cluster and its tenants, runs the clients while the nemesis runs `faults`, stops
/// the clients, reads every key once more after the cluster healed, and stops the cluster.
fn run_workload(rng: &mut StdRng, faults: &[nemesis::Fault], replicas: u8) -> Run {
    let started = Instant::now();
    let mut cluster = DevCluster::start_with_args(3, &["--replicas", &replicas.to_string()]);
    let targets = Arc::new(targets(&cluster));
    let shared = Arc::new(Shared {
        base: cluster.url(),
        recorder: Arc::new(Recorder::new()),
        stop: Arc::new(AtomicBool::new(false)),
        processes: Arc::new(AtomicU64::new(0)),
    });
    let clients: Vec<_> = (0..targets.len() * CLIENTS_PER_KEY)
        .map(|i| {
            let (targets, shared) = (targets.clone(), shared.clone());
            let client_rng = StdRng::seed_from_u64(rng.gen());
            std::thread::spawn(move || {
                client::run(&targets[i / CLIENTS_PER_KEY], &shared, client_rng)
            })
        })
        .collect();
    // Clients stop on every path, also when the nemesis fails.
    let stopper = StopOnDrop(shared.stop.clone());
    std::thread::sleep(QUIET);
    let log = {
        let tenants = (0..TENANTS)
            .map(|t| (tenant_id(t), targets[t * PHEXTS * COORDS.len()].api_key.clone()));
        let mut nemesis =
            Nemesis::new(&mut cluster, tenants.collect(), StdRng::seed_from_u64(rng.gen()));
        nemesis.run(faults);
        std::mem::take(&mut nemesis.log)
    };
    std::thread::sleep(QUIET);
    drop(stopper);
    let made: usize = clients.into_iter().map(|c| c.join().unwrap()).sum();
    let processes = shared.processes.fetch_add(targets.len() as u64, Ordering::SeqCst);
    for (i, target) in targets.iter().enumerate() {
        final_read(&shared, target, processes + i as u64);
    }
    let workload = started.elapsed();
    cluster.stop();

    Run {
        events: shared.recorder.events(),
        keys: targets.iter().map(|t| t.key).collect(),
        faults: log,
        operations: made,
        took: workload,
    }
}

/// Adds the tenants and names each key's place.
fn targets(cluster: &DevCluster) -> Vec<Target> {
    let mut targets = Vec::new();
    for tenant in 0..TENANTS {
        let api_key =
            cluster.add_tenant(&format!("reg{tenant}"), serde_json::json!({"tier": "team"}));
        for phext in 0..PHEXTS {
            for (coord, at) in COORDS.iter().enumerate() {
                targets.push(Target {
                    key: Key { tenant, phext, coord },
                    api_key: api_key.clone(),
                    phext: format!("register{phext}"),
                    coord: at.to_string(),
                });
            }
        }
    }
    targets
}

fn tenant_id(tenant: usize) -> String {
    format!("reg{tenant}")
}

/// Reads `target` once the cluster healed, by a process of its own, until it is answered:
/// the last word on every acknowledged write.
fn final_read(shared: &Shared, target: &Target, process: u64) {
    let http =
        reqwest::blocking::Client::builder().timeout(client::CLIENT_TIMEOUT).build().unwrap();
    let started = Instant::now();
    loop {
        shared.recorder.record(process, target.key, Step::Invoke(Op::Read));
        let outcome = client::send(&http, &shared.base, target, &Op::Read);
        let answered = matches!(outcome, Outcome::ReadOk(_));
        shared.recorder.record(process, target.key, Step::Complete(outcome.clone()));
        if answered {
            return;
        }
        assert!(
            started.elapsed() < FINAL_READ_LIMIT,
            "{:?}: no final read within {FINAL_READ_LIMIT:?}, last {outcome:?}",
            target.key
        );
        std::thread::sleep(client::ERROR_BACKOFF);
    }
}

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[derive(Default)]
struct Report {
    failures: Vec<String>,
    acknowledged: usize,
    indeterminate: usize,
    /// Indeterminate writes, and those of them a later read saw (they did take effect).
    indeterminate_writes: usize,
    /// By the answer the client got.
    indeterminate_writes_read: std::collections::BTreeMap<String, usize>,
    indeterminate_kinds: std::collections::BTreeMap<String, usize>,
    acknowledged_by_key: Vec<(Key, usize)>,
    mutations_refused: usize,
    took: Duration,
}

/// Checks every key's history, and the same with one read made stale (which must fail).
fn check_all(events: &[Event], keys: &[Key]) -> Report {
    let (events, keys) = (events.to_vec(), keys.to_vec());
    std::thread::Builder::new()
        .stack_size(CHECK_STACK_BYTES)
        .spawn(move || {
            let started = Instant::now();
            let mut report = Report::default();
            for key in keys {
                let mine = history::of_key(&events, key);
                count(&mine, key, &mut report);
                if let Err(e) = history::check_key(&mine) {
                    report.failures.push(format!("{key:?}: {e}"));
                }
                if let Some((stale, line)) = history::with_a_stale_read(&mine) {
                    match history::check_key(&stale) {
                        Err(history::CheckError::NotLinearizable { .. }) => {
                            report.mutations_refused += 1
                        }
                        other => report
                            .failures
                            .push(format!("{key:?}: with {line}, the checker answered {other:?}")),
                    }
                }
            }
            report.took = started.elapsed();
            report
        })
        .unwrap()
        .join()
        .unwrap()
}

/// Adds one key's counts to `report`.
fn count(events: &[Event], key: Key, report: &mut Report) {
    let read: std::collections::BTreeSet<&str> = events
        .iter()
        .filter_map(|e| match &e.step {
            Step::Complete(Outcome::ReadOk(v)) => Some(v.as_str()),
            _ => None,
        })
        .collect();
    let mut acknowledged = 0;
    let mut writing = std::collections::BTreeMap::new();
    for e in events {
        match &e.step {
            Step::Invoke(op) => {
                writing.insert(e.process, op);
            }
            Step::Complete(Outcome::Indeterminate(why)) => {
                report.indeterminate += 1;
                if let Some(Op::Write(v)) = writing.get(&e.process) {
                    report.indeterminate_writes += 1;
                    if read.contains(v.as_str()) {
                        *report.indeterminate_writes_read.entry(why.clone()).or_default() += 1;
                    }
                }
                let kind = match why.split(' ').next().unwrap_or_default() {
                    "no" if why.contains("timed out") => "timeout".to_string(),
                    "no" => "no answer".to_string(),
                    status => status.to_string(),
                };
                *report.indeterminate_kinds.entry(kind).or_default() += 1;
            }
            Step::Complete(_) => acknowledged += 1,
        }
    }
    report.acknowledged += acknowledged;
    report.acknowledged_by_key.push((key, acknowledged));
}
