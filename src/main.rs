//! `sq-cloud`: one binary for the whole service. This file only parses flags, loads config and
//! hands over to the crate that does the work (the ripgrep pattern: the root package is thin).

mod admin;
mod admin_client;
mod bench;
mod dev;
mod import;
mod signals;
mod tooling;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// Every process runs on jemalloc (node::memory explains why).
#[global_allocator]
static ALLOCATOR: node::memory::Allocator = node::memory::Allocator;

/// jemalloc reads its options through this symbol, once, before `main`.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
static malloc_conf: Option<&'static u8> = Some(&node::memory::ALLOCATOR_OPTIONS[0]);

#[derive(Parser)]
#[command(
    name = "sq-cloud",
    version,
    about = "A hosted, clustered SQ: the phext database for many tenants"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole cluster on this machine: N nodes and a gateway on loopback.
    Dev {
        /// Number of node processes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Directory for all data, certificates, logs and dev.json.
        #[arg(long, default_value = "sq-cloud-dev")]
        data: PathBuf,
        /// Address the gateway serves HTTP on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Serve HTTPS with a certificate from the cluster CA instead of plain HTTP.
        #[arg(long)]
        tls: bool,
        /// A declarative tenants file (tenants.json shape) for the nodes to apply and watch.
        #[arg(long)]
        tenants_file: Option<PathBuf>,
        /// R: how many nodes hold each tenant (1 to 5), set before the demo tenant is made.
        /// A new cluster forms with it: 3 when not given, or 1 with `--nodes 1`. A cluster already
        /// formed keeps its R unless this is given.
        #[arg(long)]
        replicas: Option<u64>,
    },
    /// Run a cluster node.
    Node {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run a gateway.
    Gateway {
        #[arg(long)]
        config: PathBuf,
    },
    /// Make the cluster CA and certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Tenants and nodes from the shell, through the admin API.
    Admin(admin::AdminArgs),
    /// Load a gateway with a mix of operations; report throughput and latency percentiles.
    Bench(bench::BenchArgs),
    /// Bring an SQ data directory of *.phext files into a tenant.
    Import(import::ImportConfig),
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create the cluster CA (ca.pem, ca.key) in DIR.
    Init {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a certificate signed by the CA in DIR.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// A node certificate for this node id.
        #[arg(long, conflicts_with_all = ["gateway", "admin"])]
        node: Option<u64>,
        /// The gateways' client certificate.
        #[arg(long)]
        gateway: bool,
        /// The operator tools' client certificate.
        #[arg(long)]
        admin: bool,
        /// The gateway's public HTTPS certificate (https.pem, https.key), for the names in
        /// --name, when ACME is not used. Clients trust it through ca.pem (curl --cacert).
        #[arg(long, conflicts_with_all = ["node", "gateway", "admin"], requires = "name")]
        https: bool,
        /// A DNS name or IP address clients reach the gateway at (repeat, or comma-separate).
        #[arg(long, value_delimiter = ',', num_args = 1.., requires = "https")]
        name: Vec<String>,
    },
}

/// Logs to stderr at [`log_directives`].
fn init_tracing() {
    let directives = log_directives(std::env::var("RUST_LOG").ok());
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(log_directives(None)));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .init();
}

/// The log filter: `RUST_LOG` (`info` if unset), with openraft's own lines off unless it names
/// openraft (`RUST_LOG=info,openraft=info`). The registry logs its leader changes itself;
/// openraft logs about 15 lines per election, and three per heartbeat for every voter it cannot
/// reach: 12 a second while one is down.
fn log_directives(rust_log: Option<String>) -> String {
    let directives = rust_log.unwrap_or_else(|| "info".into());
    match directives.contains("openraft") {
        true => directives,
        false => format!("{directives},openraft=off"),
    }
}

fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The most async worker threads a node or gateway may be configured with.
const WORKER_THREADS_MAX: usize = 1024;

/// The async runtime of a node or gateway: `worker_threads` threads, or one per core for 0.
fn runtime(worker_threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    if worker_threads > WORKER_THREADS_MAX {
        anyhow::bail!("worker_threads is {worker_threads}; it must be 0 (one per core) or at most {WORKER_THREADS_MAX}");
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if worker_threads > 0 {
        builder.worker_threads(worker_threads);
    }
    Ok(builder.enable_all().build()?)
}

/// Runs an async service on `runtime` until SIGINT or SIGTERM.
fn serve<F, Fut, E>(runtime: tokio::runtime::Runtime, start: F) -> anyhow::Result<()>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::error::Error + Send + Sync + 'static,
{
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => return tracing::error!(error = %e, "cannot watch SIGTERM"),
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            trigger.cancel();
        });
        start(shutdown).await.map_err(anyhow::Error::from)
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Dev { nodes, data, listen, tls, tenants_file, replicas } => {
            dev::run(dev::DevConfig { nodes, data, listen, tls, tenants_file, replicas })
        }
        Command::Admin(args) => admin::run(args).map_err(tooling::with_tls_hint),
        Command::Node { config } => {
            init_tracing();
            let config: node::NodeConfig = read_toml(&config)?;
            let result =
                serve(runtime(config.worker_threads)?, |shutdown| node::run(config, shutdown));
            if let Err(e) = &result {
                if let Some(removed @ node::NodeError::Removed(_)) = e.downcast_ref() {
                    eprintln!("{removed}");
                    std::process::exit(node::EXIT_REMOVED);
                }
            }
            result
        }
        Command::Gateway { config } => {
            init_tracing();
            let config: gateway::GatewayConfig = read_toml(&config)?;
            serve(runtime(config.worker_threads)?, |shutdown| gateway::run(config, shutdown))
        }
        Command::Certs(CertsCommand::Init { dir }) => {
            std::fs::create_dir_all(&dir)?;
            transport::certs::create_ca(&dir)?;
            println!("created {}/ca.pem and ca.key; keep ca.key offline", dir.display());
            Ok(())
        }
        Command::Certs(CertsCommand::Issue { dir, https: true, name, .. }) => {
            let stem = transport::certs::HTTPS_FILE_STEM;
            transport::certs::issue_https_for(&dir, stem, &name)?;
            println!(
                "issued {0}/{stem}.pem and {stem}.key for {1}; point [tls] cert and key of gateway.toml at them",
                dir.display(),
                name.join(", ")
            );
            Ok(())
        }
        Command::Certs(CertsCommand::Issue { dir, node, gateway, admin, .. }) => {
            let role = match (node, gateway, admin) {
                (Some(id), false, false) => transport::Role::Node(id),
                (None, true, false) => transport::Role::Gateway,
                (None, false, true) => transport::Role::Admin,
                _ => anyhow::bail!(
                    "choose exactly one of --node ID, --gateway, --admin, --https --name NAME"
                ),
            };
            transport::certs::issue(&dir, role)?;
            println!("issued a certificate for {role:?} in {}", dir.display());
            Ok(())
        }
        Command::Bench(args) => bench::run(args.into_config()?).map_err(tooling::with_tls_hint),
        Command::Import(config) => import::run(config).map_err(tooling::with_tls_hint),
    }
}

#[cfg(test)]
mod tests {
    use super::log_directives;

    // Goal: openraft's own lines are off by default and under an operator's RUST_LOG, and on
    // when RUST_LOG names openraft.
    #[test]
    fn openraft_lines_are_off_unless_named() {
        assert_eq!(log_directives(None), "info,openraft=off");
        assert_eq!(
            log_directives(Some("info,sq_node::meter=debug".into())),
            "info,sq_node::meter=debug,openraft=off"
        );
        assert_eq!(log_directives(Some("info,openraft=info".into())), "info,openraft=info");
    }
}
