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
        assert_eq!(
            (first.digest, first.events),
            (second.digest, second.events),
            "seed {seed} did not replay"
        );
    }
}

// Goal: different seeds make different runs: the seed reaches what the actors do (the counts of
// reads, writes, admin operations and faults), not only the trace's digest, and both runs keep
// every invariant while doing real work.
#[test]
fn seeds_differ() {
    let a = run_seed(21, &short());
    let b = run_seed(22, &short());
    for run in [&a, &b] {
        assert_eq!(run.violation, None, "seed {} broke an invariant", run.seed);
        assert!(run.stats.writes_acked > 0, "seed {}: the workload wrote nothing", run.seed);
        assert!(run.stats.faults > 0, "seed {}: no fault was injected", run.seed);
    }
    assert_ne!(a.digest, b.digest, "two seeds gave the same trace");
    assert_ne!(
        (a.events, &a.stats),
        (b.events, &b.stats),
        "two seeds gave traces that differ only in the digest"
    );
}

// Goal: seeds that once found a bug keep passing at full length. Each names what it found:
// - 348: a registry log read on open but never synced was lost by a second crash, and the node
//   could not restart its registry;
// - 4607, 5332, 7303, 8900, 9004: a new owner whose `HandoffDone` answer was lost pulled the
//   tenant again and swapped the old owner's copy in over writes it had already acknowledged;
// - 4357: an old owner that had deleted its copy after the handoff was done answered a late
//   re-pull with an empty file list, and the new owner swapped an empty tenant in;
// - 520164, 520570: a registry leader applied its own removal and stopped before taking the
//   removed nodes out of the Raft membership; with two removed nodes still counted as voters,
//   no majority was left (a removed leader now stays until its removals are finished);
// - 500243: the handoff sweeper deleted a copy that had just arrived back (it now judges a copy
//   again, under the tenant's staging lock, before it deletes it). With that second look taken
//   out, this seed still loses an acknowledged write today; seeds 0-299 do not.
// Later changes move every schedule, so a passing seed here is a record, not a proof; the
// thousands of seeds CI runs are the proof.
#[test]
fn seeds_that_found_bugs_pass() {
    for seed in [348, 4357, 4607, 5332, 7303, 8900, 9004, 500243, 520164, 520570] {
        let outcome = run_seed(seed, &Options::default());
        assert_eq!(outcome.violation, None, "seed {seed} broke an invariant");
    }
}

// Goal: seeds of the replicated cluster (R = 3) that once found a bug keep passing at full
// length:
// - 700586, 701254: a tenant's primary changed just after the heal's read (a node the checks had
//   stopped came back), and the new primary, never asked for the tenant again, kept lacking the
//   record the former one wrote, or left a backup diverged, for good (the former primary now
//   hands the tenant over: `Replication::hand_over`).
// - 700281: with two registry voters, each node's long lapse, told before it learnt it was marked
//   up, had it marked down again at once, so neither ever held a lease (a lease request now says
//   which mark of its sender the sender knows).
// - 716686: a trial design lost acknowledged writes here (not kept; docs/REPLICATION.md, "Joins
//   and drains"): the entering node was to count only once its copy caught up, writes meanwhile
//   counting on a majority of the set before the change. The primary's "caught up" answer,
//   given under one ballot, was committed after the primary had prepared again under the next
//   and counted writes without the entering node, which the leaving node then took away.
#[test]
fn replicated_seeds_that_found_bugs_pass() {
    for seed in [700586, 701254, 700281, 716686] {
        let outcome = run_seed(seed, &Options { replicas: 3, ..Options::default() });
        assert_eq!(outcome.violation, None, "seed {seed} broke an invariant");
    }
}
