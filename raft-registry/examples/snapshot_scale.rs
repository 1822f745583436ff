//! What a large registry costs a node: the state machine's memory, and the time and size of a
//! snapshot built from it, read back at startup and installed on another node.
//!
//!     for n in 100000 500000 1000000; do
//!         cargo run --release -p raft-registry --example snapshot_scale -- $n
//!     done
//!
//! Tenants are applied through the state machine as the log delivers them (batches of
//! `BATCH_COMMANDS_MAX` adds per entry). The snapshot is built and written (fsynced) exactly as
//! openraft asks for one; the state machine is then opened again from its directory, as at a
//! node's startup; last the snapshot openraft would send is installed into a second, empty
//! state machine, as a follower that fell behind the log receives it (its chunks already
//! reassembled). The last line is one row of the table in docs/BENCHMARKS.md.

use std::io::Cursor;
use std::time::Instant;

use anyhow::Context;
use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{CommittedLeaderId, EntryPayload};
use raft_registry::state_machine::{StateMachineStore, SNAPSHOT_FILE};
use raft_registry::types::{Entry, LogId};
use raft_registry::{key_hash, Command, TenantRecord, Tier, BATCH_COMMANDS_MAX};

/// A memory figure of this process from /proc/self/status, in MiB (0 elsewhere): `VmRSS:` now,
/// `VmHWM:` the peak.
fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok());
    kib.unwrap_or(0.0) / 1024.0
}

fn rss_mib() -> f64 {
    status_mib("VmRSS:")
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let tenants: usize = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => 1_000_000,
    };
    let dir = tempfile::tempdir()?;
    let (mut sm, _watch) = StateMachineStore::open(&dir.path().join("a"))?;
    let rss_empty = rss_mib();
    let started = Instant::now();
    let mut index = 0;
    let mut next = 0;
    while next < tenants {
        let batch: Vec<Command> = (next..tenants.min(next + BATCH_COMMANDS_MAX))
            .map(|i| {
                let id = format!("tenant-{i:07}");
                let hash = key_hash(&format!("pmb-v1-{i:032x}"));
                let mut record = TenantRecord::new(id, Tier::Free, hash, 1_700_000_000_000);
                record.admin_email = Some(format!("owner{i}@example.com"));
                Command::AddTenant(record)
            })
            .collect();
        next += batch.len();
        index += 1;
        let entry = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Command::Batch(batch)),
        };
        let replies = sm.apply([entry]).await?;
        anyhow::ensure!(replies.iter().all(|r| r.batch.iter().all(Result::is_ok)), "an add failed");
    }
    let applied_s = started.elapsed().as_secs_f64();
    let rss_full = rss_mib();

    let started = Instant::now();
    let snapshot = sm.get_snapshot_builder().await.build_snapshot().await?;
    let build_s = started.elapsed().as_secs_f64();
    let rss_built = status_mib("VmHWM:");
    drop(snapshot);
    let file_bytes = std::fs::metadata(dir.path().join("a").join(SNAPSHOT_FILE))?.len();
    drop(sm);

    let started = Instant::now();
    let (mut sm, watch) = StateMachineStore::open(&dir.path().join("a"))?;
    let reopen_s = started.elapsed().as_secs_f64();
    anyhow::ensure!(watch.borrow().1.tenant_count() == tenants, "the reopened node misses tenants");

    let sent = sm.get_current_snapshot().await?.context("no snapshot to send")?;
    let data = sent.snapshot.into_inner();
    let size = data.len();
    let (mut follower, watch) = StateMachineStore::open(&dir.path().join("b"))?;
    let started = Instant::now();
    follower.install_snapshot(&sent.meta, Box::new(Cursor::new(data))).await?;
    let install_s = started.elapsed().as_secs_f64();
    anyhow::ensure!(watch.borrow().1.tenant_count() == tenants, "the follower misses tenants");

    println!("tenants                 {tenants}");
    println!("applied in              {applied_s:.1} s ({:.0} adds/s)", tenants as f64 / applied_s);
    println!(
        "state machine memory    {:.0} MiB ({:.0} B per tenant)",
        rss_full - rss_empty,
        (rss_full - rss_empty) * 1048576.0 / tenants as f64
    );
    println!(
        "snapshot file           {:.1} MiB ({:.0} B per tenant; image {size} B)",
        file_bytes as f64 / 1048576.0,
        file_bytes as f64 / tenants as f64
    );
    println!("snapshot build + fsync  {build_s:.2} s (peak RSS then {rss_built:.0} MiB)");
    println!("read back at open       {reopen_s:.2} s");
    println!("snapshot install        {install_s:.2} s");
    let peak = status_mib("VmHWM:");
    println!("peak RSS                {peak:.0} MiB (at the end: two state machines)");
    println!(
        "| {tenants} | {:.1} MiB | {build_s:.2} s | {reopen_s:.2} s | {install_s:.2} s | {:.0} MiB \
         | {rss_built:.0} MiB | {peak:.0} MiB |",
        file_bytes as f64 / 1048576.0,
        rss_full - rss_empty
    );
    Ok(())
}
