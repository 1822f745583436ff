//! `node.toml`: one struct, every field documented with its default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use raft_registry::REPLICAS_MAX;

/// Default memory the tenant store may hold before it unloads least-recently-used tenants.
pub const DEFAULT_MEMORY_BUDGET_MB: u64 = 1024;

/// Default idle time after which a tenant is unloaded from memory.
pub const DEFAULT_IDLE_UNLOAD_S: u64 = 60;

/// Default cap on the tenants a node keeps loaded at once.
pub const DEFAULT_LOADED_TENANTS_MAX: usize = 8192;

/// Default R of a new cluster: every tenant on three nodes (docs/REPLICATION.md).
pub const DEFAULT_REPLICAS: u8 = 3;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's id in the cluster. Ids are never reused: a removed node's id stays retired.
    pub id: u64,
    /// Where this node keeps its registry and its tenants' data.
    pub data_dir: PathBuf,
    /// UDP address the QUIC service binds, e.g. `0.0.0.0:7100`.
    pub listen: SocketAddr,
    /// Address other nodes and gateways reach this node at. Default: `listen`.
    #[serde(default)]
    pub advertise: Option<SocketAddr>,
    /// Directory with `ca.pem` and this node's `node-<id>.pem` / `.key` from `sq-cloud certs`.
    pub cluster_certs: PathBuf,
    /// Start a new cluster with this node as its only member, if the registry is empty.
    /// Exactly one node of a new cluster sets it; the rest join through the admin API.
    #[serde(default)]
    pub bootstrap: bool,
    /// SHA-256 (hex) of the admin key, recorded in the registry at bootstrap. Never the key.
    #[serde(default)]
    pub admin_key_hash: Option<String>,
    /// R, the number of nodes that hold each tenant (1 to 5), recorded in the registry when the
    /// bootstrap node forms a new cluster. Unused on other nodes and on a cluster already formed
    /// (`sq-cloud admin cluster replicas` changes it later: by one at a time once there are
    /// tenants). Default 3.
    /// A cluster with fewer active nodes keeps as many copies as it has nodes.
    #[serde(default = "default_replicas")]
    pub replicas: u8,
    /// Memory, in MiB, the tenant store may hold before unloading idle tenants.
    #[serde(default = "default_memory_budget_mb")]
    pub memory_budget_mb: u64,
    /// Seconds without a request after which a tenant is unloaded.
    #[serde(default = "default_idle_unload_s")]
    pub idle_unload_s: u64,
    /// The most tenants loaded at once; past it the least recently used are unloaded. Each
    /// holds an open log file, so the node lowers it (and says so in its log) to fit under its
    /// open-file limit with `files::FILES_RESERVED` to spare. Default: 8192.
    #[serde(default = "default_loaded_tenants_max")]
    pub loaded_tenants_max: usize,
    /// A declarative tenants file (the seeds' tenants.json shape), applied and watched.
    #[serde(default)]
    pub tenants_file: Option<PathBuf>,
    /// Tenant handoff: parallelism, bandwidth, chunk size, grace period.
    #[serde(default)]
    pub handoff: crate::handoff::HandoffConfig,
    /// Health gossip: heartbeat interval and the silences after which a peer is suspect, dead.
    #[serde(default)]
    pub gossip: crate::gossip::GossipConfig,
    /// Threads of the async runtime: 0 (the default) for one per core. `sq-cloud dev`, whose
    /// processes share one machine, gives each its share of the cores.
    #[serde(default)]
    pub worker_threads: usize,
}

fn default_memory_budget_mb() -> u64 {
    DEFAULT_MEMORY_BUDGET_MB
}

fn default_loaded_tenants_max() -> usize {
    DEFAULT_LOADED_TENANTS_MAX
}

fn default_idle_unload_s() -> u64 {
    DEFAULT_IDLE_UNLOAD_S
}

fn default_replicas() -> u8 {
    DEFAULT_REPLICAS
}

impl NodeConfig {
    /// The configuration `sq-cloud dev` writes for one of its nodes.
    pub fn dev(
        id: u64,
        addr: SocketAddr,
        data_dir: &Path,
        certs: &Path,
        bootstrap: bool,
        admin_key: &str,
    ) -> NodeConfig {
        NodeConfig {
            id,
            data_dir: data_dir.to_path_buf(),
            listen: addr,
            advertise: None,
            cluster_certs: certs.to_path_buf(),
            bootstrap,
            admin_key_hash: bootstrap.then(|| proto::auth::key_hash(admin_key)),
            replicas: DEFAULT_REPLICAS,
            memory_budget_mb: DEFAULT_MEMORY_BUDGET_MB,
            idle_unload_s: DEFAULT_IDLE_UNLOAD_S,
            loaded_tenants_max: DEFAULT_LOADED_TENANTS_MAX,
            tenants_file: None,
            handoff: Default::default(),
            gossip: Default::default(),
            worker_threads: 0,
        }
    }

    pub fn advertise(&self) -> SocketAddr {
        self.advertise.unwrap_or(self.listen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the shipped example node.toml parses, and says what the defaults are.
    #[test]
    fn the_example_config_parses_with_the_defaults() {
        let config: NodeConfig =
            toml::from_str(include_str!("../../deploy/node.toml")).expect("deploy/node.toml");
        assert_eq!(config.loaded_tenants_max, DEFAULT_LOADED_TENANTS_MAX);
        assert_eq!(config.memory_budget_mb, DEFAULT_MEMORY_BUDGET_MB);
        assert_eq!(config.idle_unload_s, DEFAULT_IDLE_UNLOAD_S);
        assert_eq!(config.replicas, DEFAULT_REPLICAS);
        let unset: NodeConfig = toml::from_str(
            "id = 1\ndata_dir = \"d\"\nlisten = \"127.0.0.1:7100\"\ncluster_certs = \"c\"\n",
        )
        .expect("the fewest fields");
        assert_eq!(unset.loaded_tenants_max, DEFAULT_LOADED_TENANTS_MAX);
    }
}
