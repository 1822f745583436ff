//! Runs of the whole simulation, kept short so `cargo test` stays quick in a debug build.

use std::time::Duration;

use sim::{run_seed, Options};

fn short() -> Options {
    Options { chaos: Duration::from_secs(8), ..Options::default() }
}

// Goal: a handful of seeds, faults included, keep every invariant, and each replays to the same
// trace (same digest, same number of events) when run again.
#[test]
fn a_few_seeds_pass_and_replay_exactly() {
    for seed in [11, 12, 13] {
        let first = run_seed(seed, &short());
        assert_eq!(first.violation, None, "seed {seed} broke an invariant");
        assert!(first.stats.writes_acked > 0, "seed {seed}: the workload wrote nothing");
        let second = run_seed(seed, &short());
        assert_eq!((first.digest, first.events), (second.digest, second.events), "seed {seed} did not replay");
    }
}

// Goal: different seeds make different runs (the seed reaches the schedule).
#[test]
fn seeds_differ() {
    let a = run_seed(21, &short());
    let b = run_seed(22, &short());
    assert_ne!(a.digest, b.digest);
}
