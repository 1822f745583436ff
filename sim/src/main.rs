//! `sim`: runs seeds of the deterministic cluster simulation.
//!
//! ```text
//! sim --seeds N [--first S] [--check-determinism] [--census] [--threads T] [--chaos-s SECONDS]
//! sim --seed S [-v | -vv] [--chaos-s SECONDS]
//! either with [--no-faults] [--replicas R]
//! ```
//!
//! Prints one line per failing seed (the seed and the invariant it broke) and closes with
//! `N passed, M failed`. `--seed S` replays one seed and prints its trace. `--census` also
//! prints, per seed and in all, the faults and workload the runs went through.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use sim::world::Stats;
use sim::{run_seed, Options, Outcome, Verbosity};

struct Args {
    seeds: u64,
    first: u64,
    one: Option<u64>,
    determinism: bool,
    census: bool,
    threads: usize,
    options: Options,
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: sim --seeds N [--first S] [--check-determinism] [--census] [--threads T] [--chaos-s SECONDS]"
    );
    eprintln!("       sim --seed S [-v | -vv] [--chaos-s SECONDS]");
    eprintln!("       either with [--no-faults] [--replicas R]");
    ExitCode::from(2)
}

/// Why the command line was refused; printed before the usage.
#[derive(Debug)]
enum ArgsError {
    /// A flag that takes a value came last.
    MissingValue(&'static str),
    /// A flag's value is not a whole number.
    NotANumber {
        flag: &'static str,
        source: std::num::ParseIntError,
    },
    Unknown(String),
    /// Neither `--seeds N` nor `--seed S`.
    NothingToRun,
}

impl std::fmt::Display for ArgsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArgsError::MissingValue(flag) => write!(f, "{flag} needs a value"),
            ArgsError::NotANumber { flag, source } => write!(f, "{flag}: {source}"),
            ArgsError::Unknown(other) => write!(f, "unknown argument {other}"),
            ArgsError::NothingToRun => f.write_str("say --seeds N or --seed S"),
        }
    }
}

impl std::error::Error for ArgsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ArgsError::NotANumber { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn parse() -> Result<Args, ArgsError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut a = Args {
        seeds: 0,
        first: 0,
        one: None,
        determinism: false,
        census: false,
        threads,
        options: Options::default(),
    };
    let mut it = std::env::args().skip(1);
    let number = |v: Option<String>, flag: &'static str| -> Result<u64, ArgsError> {
        v.ok_or(ArgsError::MissingValue(flag))?
            .parse::<u64>()
            .map_err(|source| ArgsError::NotANumber { flag, source })
    };
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--seeds" => a.seeds = number(it.next(), "--seeds")?,
            "--first" => a.first = number(it.next(), "--first")?,
            "--seed" => a.one = Some(number(it.next(), "--seed")?),
            "--check-determinism" => a.determinism = true,
            "--census" => a.census = true,
            "--threads" => a.threads = number(it.next(), "--threads")?.max(1) as usize,
            "--chaos-s" => a.options.chaos = Duration::from_secs(number(it.next(), "--chaos-s")?),
            "--no-faults" => a.options.faults = false,
            "--replicas" => {
                let r = number(it.next(), "--replicas")?;
                a.options.replicas = u8::try_from(r).unwrap_or(u8::MAX);
            }
            "-v" => a.options.verbosity = Verbosity::Events,
            "-vv" => a.options.verbosity = Verbosity::Messages,
            other => return Err(ArgsError::Unknown(other.to_string())),
        }
    }
    if a.one.is_none() && a.seeds == 0 {
        return Err(ArgsError::NothingToRun);
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("sim: {e}");
            return usage();
        }
    };
    if std::env::var_os("RUST_LOG").is_some() {
        // The nodes' own log lines (stamped with wall time, not simulated time), for one replay.
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    match args.one {
        Some(seed) => replay(seed, &args),
        None => many(&args),
    }
}

/// Replays one seed with its trace.
fn replay(seed: u64, args: &Args) -> ExitCode {
    let mut options = args.options.clone();
    if options.verbosity == Verbosity::Quiet {
        options.verbosity = Verbosity::Events;
    }
    let out = run_seed(seed, &options);
    let s = &out.stats;
    println!(
        "seed {seed}: {} events, digest {:016x}; writes {} acknowledged, {} refused, {} unknown; reads {} ok, {} failed; admin {} ok, {} failed; {} faults",
        out.events, out.digest, s.writes_acked, s.writes_refused, s.writes_unknown, s.reads_ok, s.reads_failed, s.admin_ok, s.admin_failed, s.faults
    );
    println!("simulated {:.1} s in {:.2} s", out.simulated.as_secs_f64(), out.wall.as_secs_f64());
    let failed = report(&out);
    println!("{} passed, {} failed", u64::from(!failed), u64::from(failed));
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Prints the line of a failing seed; returns whether it failed.
fn report(out: &Outcome) -> bool {
    match &out.violation {
        Some(v) => {
            println!("seed {}: FAILED {}: {}", out.seed, v.invariant, v.detail);
            true
        }
        None => false,
    }
}

/// Runs many seeds over the threads; with `--check-determinism`, each twice.
fn many(args: &Args) -> ExitCode {
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(args.first));
    let end = args.first + args.seeds;
    let (tx, rx) = mpsc::channel::<(Outcome, Option<Outcome>)>();
    let mut workers = Vec::new();
    for _ in 0..args.threads {
        let (next, tx, options, twice) =
            (next.clone(), tx.clone(), args.options.clone(), args.determinism);
        workers.push(std::thread::spawn(move || loop {
            let seed = next.fetch_add(1, Ordering::SeqCst);
            if seed >= end {
                return;
            }
            let first = run_seed(seed, &options);
            let second = twice.then(|| run_seed(seed, &options));
            if tx.send((first, second)).is_err() {
                return;
            }
        }));
    }
    drop(tx);
    let (mut passed, mut failed, mut simulated, mut busy) =
        (0u64, 0u64, Duration::ZERO, Duration::ZERO);
    let mut census: Vec<(u64, Stats)> = Vec::new();
    for (first, second) in rx {
        if args.census {
            census.push((first.seed, first.stats.clone()));
        }
        simulated += first.simulated;
        busy += first.wall + second.as_ref().map_or(Duration::ZERO, |s| s.wall);
        let mut bad = report(&first);
        if let Some(second) = second {
            if second.digest != first.digest || second.violation != first.violation {
                println!(
                    "seed {}: FAILED determinism: two runs differ (trace digests {:016x} and {:016x}, {} and {} events)",
                    first.seed, first.digest, second.digest, first.events, second.events
                );
                bad = true;
            }
        }
        if bad {
            failed += 1;
        } else {
            passed += 1;
        }
    }
    for w in workers {
        let _ = w.join();
    }
    if args.census {
        print_census(census);
    }
    let wall = started.elapsed();
    println!(
        "simulated {:.0} s in {:.1} s of wall time on {} threads ({:.0} s of thread time): {:.0}x real time per thread{}",
        simulated.as_secs_f64(),
        wall.as_secs_f64(),
        args.threads,
        busy.as_secs_f64(),
        simulated.as_secs_f64() / busy.as_secs_f64().max(1e-9) * if args.determinism { 2.0 } else { 1.0 },
        if args.determinism { ", each seed run twice" } else { "" }
    );
    println!("{passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The census: per seed, then in all, what the runs went through while the faults went on.
fn print_census(mut rows: Vec<(u64, Stats)>) {
    rows.sort_by_key(|(seed, _)| *seed);
    let columns = [
        "partitions",
        "crashes",
        "freezes",
        "disk faults",
        "disks lost",
        "membership",
        "handoffs done",
        "revoked-key requests (refused)",
        "boundary writes",
        "507s",
        "429s",
    ];
    println!("census: seed, {}", columns.join(", "));
    let line = |s: &Stats| {
        format!(
            "{}, {}, {}, {}, {}, {}, {}, {} ({}), {}, {}, {}",
            s.partitions,
            s.crashes,
            s.freezes,
            s.disk_faults,
            s.disk_losses,
            s.membership_changes,
            s.handoffs_done,
            s.revoked_requests,
            s.revoked_refused,
            s.boundary_writes,
            s.quota_refusals,
            s.rate_refusals
        )
    };
    let mut total = Stats::default();
    let (mut with_membership, mut with_handoff, mut with_both) = (0u64, 0u64, 0u64);
    for (seed, s) in &rows {
        println!("census: {seed}, {}", line(s));
        total.partitions += s.partitions;
        total.crashes += s.crashes;
        total.freezes += s.freezes;
        total.disk_faults += s.disk_faults;
        total.disk_losses += s.disk_losses;
        total.membership_changes += s.membership_changes;
        total.handoffs_done += s.handoffs_done;
        total.revoked_requests += s.revoked_requests;
        total.revoked_refused += s.revoked_refused;
        total.boundary_writes += s.boundary_writes;
        total.quota_refusals += s.quota_refusals;
        total.rate_refusals += s.rate_refusals;
        with_membership += u64::from(s.membership_changes > 0);
        with_handoff += u64::from(s.handoffs_done > 0);
        with_both += u64::from(s.membership_changes > 0 && s.handoffs_done > 0);
    }
    println!("census: all {} seeds, {}", rows.len(), line(&total));
    println!(
        "census: {with_membership} of {} seeds made a membership change during the faults, {with_handoff} finished a handoff during them, {with_both} both",
        rows.len()
    );
}
