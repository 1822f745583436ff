//! An in-process cluster over an in-memory `RaftTransport`, with partitions.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use anyhow::{bail, Context};
use raft_registry::{
    key_hash, Command, CommandResult, RaftTransport, Registry, RegistryConfig, RegistryError,
    RegistryState, TenantRecord, Tier, TransportFuture,
};

/// Upper bound for any single wait in these tests: several election rounds on a slow machine.
pub const WAIT_LIMIT: Duration = Duration::from_secs(30);
/// Polling period of bounded waits on metrics.
pub const POLL: Duration = Duration::from_millis(20);

/// Fast but not flaky timing for a 2-core machine with real fsyncs.
pub fn test_config() -> RegistryConfig {
    RegistryConfig {
        heartbeat_interval_ms: 100,
        election_timeout_min_ms: 500,
        election_timeout_max_ms: 1_000,
        snapshot_logs_since_last: 20,
        logs_to_keep_after_snapshot: 5,
        write_timeout_ms: 3_000,
        read_timeout_ms: 3_000,
        learner_catchup_timeout_ms: 10_000,
        membership_change_timeout_ms: 10_000,
        leader_wait_timeout_ms: 10_000,
        ..RegistryConfig::default()
    }
}

/// The in-memory network: live registries by id, and the set of partitioned ids.
#[derive(Default)]
pub struct MemNet {
    nodes: Mutex<HashMap<u64, Weak<Registry>>>,
    cut: Mutex<HashSet<u64>>,
    /// Ids whose address leads to another node (as a wrong address in `nodes add` would).
    aliases: Mutex<HashMap<u64, u64>>,
}

impl MemNet {
    fn lookup(&self, from: u64, target: u64) -> Result<Arc<Registry>, String> {
        let cut = self.cut.lock().map_err(|e| e.to_string())?;
        if cut.contains(&from) || cut.contains(&target) {
            return Err(format!("partitioned: {from} -> {target}"));
        }
        drop(cut);
        let target =
            self.aliases.lock().map_err(|e| e.to_string())?.get(&target).copied().unwrap_or(target);
        let nodes = self.nodes.lock().map_err(|e| e.to_string())?;
        nodes.get(&target).and_then(Weak::upgrade).ok_or_else(|| format!("node {target} is down"))
    }

    /// Sends whatever is meant for `id` to node `to` instead.
    pub fn alias(&self, id: u64, to: u64) {
        self.aliases.lock().expect("test mutex").insert(id, to);
    }

    pub fn partition(&self, id: u64, cut: bool) {
        let mut set = self.cut.lock().expect("test mutex");
        if cut {
            set.insert(id);
        } else {
            set.remove(&id);
        }
    }
}

/// One node's view of the in-memory network.
pub struct MemTransport {
    from: u64,
    net: Arc<MemNet>,
}

impl RaftTransport for MemTransport {
    fn send(&self, target: u64, _addr: &str, payload: Vec<u8>) -> TransportFuture<'_> {
        Box::pin(async move {
            let peer = self.net.lookup(self.from, target)?;
            let reply = peer.handle_rpc(&payload).await;
            // A partition that started meanwhile loses the reply.
            self.net.lookup(self.from, target)?;
            Ok(reply)
        })
    }
}

pub fn addr(id: u64) -> String {
    format!("10.0.0.{id}:7000")
}

pub fn add_tenant(id: &str) -> Command {
    let hash = key_hash(&format!("pmb-v1-key-of-{id}"));
    Command::AddTenant(TenantRecord::new(id.to_string(), Tier::Free, hash, 1_700_000_000_000))
}

/// A cluster of registries, each in its own directory under one temp root.
pub struct Cluster {
    pub net: Arc<MemNet>,
    root: tempfile::TempDir,
    pub nodes: BTreeMap<u64, Arc<Registry>>,
    config: RegistryConfig,
}

impl Cluster {
    pub fn new(config: RegistryConfig) -> anyhow::Result<Cluster> {
        Ok(Cluster {
            net: Arc::default(),
            root: tempfile::tempdir()?,
            nodes: BTreeMap::new(),
            config,
        })
    }

    pub fn dir(&self, id: u64) -> PathBuf {
        self.root.path().join(format!("node-{id}"))
    }

    /// Opens node `id` from its directory and connects it to the network.
    pub async fn start(&mut self, id: u64) -> anyhow::Result<Arc<Registry>> {
        let transport = Arc::new(MemTransport { from: id, net: self.net.clone() });
        let reg =
            Arc::new(Registry::open(&self.dir(id), id, self.config.clone(), transport).await?);
        self.net.nodes.lock().expect("test mutex").insert(id, Arc::downgrade(&reg));
        self.nodes.insert(id, reg.clone());
        Ok(reg)
    }

    /// Shuts node `id` down and disconnects it (its directory stays).
    pub async fn stop(&mut self, id: u64) -> anyhow::Result<()> {
        self.net.nodes.lock().expect("test mutex").remove(&id);
        if let Some(reg) = self.nodes.remove(&id) {
            reg.shutdown().await?;
        }
        Ok(())
    }

    /// Stops node `id` cleanly ([`Registry::close`]) and disconnects it (its directory stays).
    pub async fn close(&mut self, id: u64) -> anyhow::Result<()> {
        self.net.nodes.lock().expect("test mutex").remove(&id);
        if let Some(reg) = self.nodes.remove(&id) {
            reg.close().await?;
        }
        Ok(())
    }

    pub fn node(&self, id: u64) -> anyhow::Result<Arc<Registry>> {
        self.nodes.get(&id).cloned().with_context(|| format!("node {id} is not running"))
    }

    /// Starts node 1 and bootstraps a one-node cluster.
    pub async fn bootstrap(&mut self) -> anyhow::Result<()> {
        let first = self.start(1).await?;
        first.bootstrap(addr(1), 1).await?;
        Ok(())
    }

    /// Starts node `id` and joins it through the current leader.
    pub async fn join(&mut self, id: u64) -> anyhow::Result<()> {
        self.start(id).await?;
        let leader = self.leader(&[id]).await?;
        self.node(leader)?.join_node(id, addr(id)).await?;
        Ok(())
    }

    /// Waits until a running node outside `excluded` leads, and returns the one with the highest
    /// term (a deposed leader cut off by a partition may still believe it leads, in an old term).
    pub async fn leader(&self, excluded: &[u64]) -> anyhow::Result<u64> {
        poll("a leader", || {
            let statuses =
                self.nodes.iter().filter(|(id, _)| !excluded.contains(id)).map(|(_, r)| r.status());
            statuses.filter(|s| s.is_leader).max_by_key(|s| s.term).map(|s| s.id)
        })
        .await
    }

    /// Writes `cmd` through whichever node leads, retrying across elections for at most
    /// [`WAIT_LIMIT`]. Returns the first answer that is not about leadership or time.
    pub async fn write(
        &self,
        cmd: Command,
    ) -> anyhow::Result<Result<CommandResult, RegistryError>> {
        let deadline = tokio::time::Instant::now() + WAIT_LIMIT;
        loop {
            let leader = self.leader(&[]).await?;
            let err = match self.node(leader)?.write(cmd.clone()).await {
                Err(
                    e @ (RegistryError::NotLeader { .. }
                    | RegistryError::Timeout { .. }
                    | RegistryError::Shutdown),
                ) => e,
                other => return Ok(other),
            };
            if tokio::time::Instant::now() >= deadline {
                bail!("write did not land in time; last error: {err}");
            }
            // Leadership is changing hands; give the election a moment before asking again.
            tokio::time::sleep(POLL).await;
        }
    }

    /// A linearizable read from the current leader.
    pub async fn read(&self) -> anyhow::Result<Arc<RegistryState>> {
        let leader = self.leader(&[]).await?;
        Ok(self.node(leader)?.read_linearizable().await?)
    }
}

/// Polls `f` every [`POLL`] until it yields a value, for at most [`WAIT_LIMIT`].
pub async fn poll<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = tokio::time::Instant::now() + WAIT_LIMIT;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until `reg` has applied at least `index` (through its watch channel).
pub async fn applied(reg: &Registry, index: u64) -> anyhow::Result<Arc<RegistryState>> {
    let mut rx = reg.subscribe();
    let seen = tokio::time::timeout(WAIT_LIMIT, rx.wait_for(|(i, _)| *i >= index))
        .await
        .with_context(|| format!("node {} did not apply index {index}", reg.id()))??;
    Ok(seen.1.clone())
}

/// Runs a whole test body under one time limit.
pub async fn bounded_test(body: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::time::timeout(TEST_LIMIT, body).await.context("test exceeded its time limit")?
}

/// Time limit of one cluster test.
pub const TEST_LIMIT: Duration = Duration::from_secs(120);
