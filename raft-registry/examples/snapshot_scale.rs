//! What a large registry costs a node: the state machine's memory, and the time and size of a
//! snapshot built from it and installed on another node.
//!
//!     cargo run --release -p raft-registry --example snapshot_scale -- 1000000
//!
//! Tenants are applied through the state machine as the log delivers them (batches of
//! `BATCH_COMMANDS_MAX` adds per entry). The snapshot is built and written (fsynced) exactly as
//! openraft asks for one, then installed into a second, empty state machine, as a follower
//! that fell behind the log receives it (its chunks already reassembled).

use std::io::Cursor;
use std::time::Instant;

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{CommittedLeaderId, EntryPayload};
use raft_registry::state_machine::StateMachineStore;
use raft_registry::types::{Entry, LogId};
use raft_registry::{key_hash, Command, TenantRecord, Tier, BATCH_COMMANDS_MAX};

/// Resident memory of this process, from /proc (0 elsewhere).
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok());
    kib.unwrap_or(0.0) / 1024.0
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
    let data = snapshot.snapshot.into_inner();
    let size = data.len();

    let (mut follower, watch) = StateMachineStore::open(&dir.path().join("b"))?;
    let started = Instant::now();
    follower.install_snapshot(&snapshot.meta, Box::new(Cursor::new(data))).await?;
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
        "snapshot size           {:.1} MiB ({:.0} B per tenant)",
        size as f64 / 1048576.0,
        size as f64 / tenants as f64
    );
    println!("snapshot build + fsync  {build_s:.2} s");
    println!("snapshot install        {install_s:.2} s");
    println!(
        "process RSS at the end  {:.0} MiB (two state machines, the snapshot's bytes)",
        rss_mib()
    );
    Ok(())
}
