//! `sq-cloud dev`: a whole cluster on one machine from one command.
//!
//! It makes a CA and certificates, N node processes and one gateway process on loopback (real
//! QUIC, real Raft), bootstraps the registry, an admin key and a demo tenant, writes `dev.json`,
//! restarts any child that dies, and stops them all on Ctrl-C or SIGTERM. Run again on the same
//! directory, it resumes with everything intact.

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// How long the cluster may take to answer its first admin request before `dev` gives up.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// How often the supervisor looks at its children.
const SUPERVISE_TICK: Duration = Duration::from_millis(100);

/// Pause before restarting a child that died, so a child that dies at once is not spun on.
const RESTART_PAUSE: Duration = Duration::from_millis(500);

/// How long children get to stop after SIGTERM before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The tenant `dev` creates for trying the API.
const DEMO_TENANT: &str = "demo";

#[derive(Debug, Clone)]
pub struct DevConfig {
    pub nodes: usize,
    pub data: PathBuf,
    pub listen: SocketAddr,
    pub tls: bool,
    /// A tenants file every node watches (only the registry leader applies it).
    pub tenants_file: Option<PathBuf>,
    /// R, set once the nodes are joined and before the demo tenant is made.
    pub replicas: Option<u64>,
}

/// `dev.json`, as PRODUCT.md §6 lists its fields, plus what a resume needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevJson {
    pub gateway_url: String,
    pub admin_key: String,
    pub demo_tenant: String,
    pub demo_key: String,
    pub nodes: Vec<DevNode>,
    pub gateway_pid: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevNode {
    pub id: u64,
    pub pid: u32,
    pub data_dir: PathBuf,
    /// The node's QUIC address; fixed at the first run because the registry records it.
    pub addr: SocketAddr,
}

struct Proc {
    name: String,
    args: Vec<String>,
    child: Child,
}

impl Proc {
    fn start(name: &str, args: Vec<String>, log_dir: &Path) -> anyhow::Result<Proc> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_dir.join(format!("{name}.log")))
            .with_context(|| format!("opening the log of {name}"))?;
        let child = Command::new(exe()?)
            .args(&args)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc { name: name.to_string(), args, child })
    }
}

/// This binary's path, read once: after a rebuild replaces the file, `current_exe` names a
/// deleted file, and a child restarted from it would fail to start.
fn exe() -> anyhow::Result<&'static Path> {
    static EXE: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    EXE.get_or_init(|| std::env::current_exe().ok())
        .as_deref()
        .context("locating the sq-cloud binary")
}

/// A UDP port free on loopback now, for a node: below the kernel's ephemeral range when one is
/// free there (`transport::ports`).
fn free_udp_port() -> anyhow::Result<u16> {
    let below = transport::free_loopback_port(|p| UdpSocket::bind(("127.0.0.1", p)).is_ok());
    match below {
        Some(port) => Ok(port),
        None => Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port()),
    }
}

/// Runs the dev cluster until a signal arrives.
pub fn run(config: DevConfig) -> anyhow::Result<()> {
    if config.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let replicas = bootstrap_replicas(config.nodes, config.replicas)?;
    exe()?;
    std::fs::create_dir_all(&config.data)
        .with_context(|| format!("creating {}", config.data.display()))?;
    let tenants_file = config
        .tenants_file
        .as_deref()
        .map(std::path::absolute)
        .transpose()
        .context("resolving --tenants-file")?;
    let data = config.data.canonicalize()?;
    let json_path = data.join("dev.json");
    let previous = previous_run(&data, config.nodes)?;
    // Refuse early if the HTTP port is taken: a clear error beats a gateway crash loop.
    drop(TcpListener::bind(config.listen).with_context(|| format!("{} is in use", config.listen))?);
    let certs = data.join("certs");
    make_certs(&certs, config.nodes)?;
    let admin_key = match &previous {
        Some(p) => p.admin_key.clone(),
        None => gateway::admin::new_tenant_key().replacen("pmb-v1-", "sqa-", 1),
    };
    let threads = worker_threads_each(config.nodes + 1);
    let mut nodes = Vec::new();
    for id in 1..=config.nodes as u64 {
        let node = dev_node(id, &data, previous.as_ref())?;
        let mut node_config =
            node::NodeConfig::dev(id, node.addr, &node.data_dir, &certs, id == 1, &admin_key);
        node_config.tenants_file = tenants_file.clone();
        node_config.replicas = replicas;
        node_config.worker_threads = threads;
        std::fs::write(node.data_dir.join("node.toml"), toml::to_string(&node_config)?)?;
        nodes.push(node);
    }
    let gateway_toml = data.join("gateway.toml");
    write_gateway_config(&gateway_toml, &config, &certs, &nodes, threads)?;
    let mut procs = start_all(&nodes, &gateway_toml, &data)?;
    let scheme = if config.tls { "https" } else { "http" };
    let gateway_url = format!("{scheme}://{}", config.listen);
    let outcome =
        bring_up(&gateway_url, &admin_key, &nodes, previous.as_ref(), &data, config.replicas);
    let demo_key = match outcome {
        Ok(k) => k,
        Err(e) => {
            stop_all(&mut procs);
            return Err(
                e.context(format!("the cluster did not come up; logs are in {}", data.display()))
            );
        }
    };
    for (n, p) in nodes.iter_mut().zip(&procs) {
        n.pid = p.child.id();
    }
    let dev = DevJson {
        gateway_url: gateway_url.clone(),
        admin_key,
        demo_tenant: DEMO_TENANT.into(),
        demo_key,
        nodes: nodes.clone(),
        gateway_pid: procs.last().map_or(0, |p| p.child.id()),
    };
    write_dev_json(&json_path, &dev)?;
    print_banner(&dev, &json_path);
    supervise(&mut procs, &mut nodes, &json_path, dev)
}

/// Node `id` of the cluster, its directory made: at the address it had in the earlier run of
/// this data directory, or at a free port.
fn dev_node(id: u64, data: &Path, previous: Option<&DevJson>) -> anyhow::Result<DevNode> {
    let dir = data.join(format!("node-{id}"));
    let addr = match previous.and_then(|p| p.nodes.iter().find(|n| n.id == id)) {
        Some(n) => n.addr,
        None => SocketAddr::from(([127, 0, 0, 1], free_udp_port()?)),
    };
    std::fs::create_dir_all(&dir)?;
    Ok(DevNode { id, pid: 0, data_dir: dir, addr })
}

/// Starts every node's process, then the gateway's (last, as `supervise` expects).
fn start_all(nodes: &[DevNode], gateway_toml: &Path, data: &Path) -> anyhow::Result<Vec<Proc>> {
    let mut procs = Vec::new();
    for n in nodes {
        let args = vec![
            "node".into(),
            "--config".into(),
            n.data_dir.join("node.toml").display().to_string(),
        ];
        procs.push(Proc::start(&format!("node-{}", n.id), args, data)?);
    }
    let gw_args = vec!["gateway".into(), "--config".into(), gateway_toml.display().to_string()];
    procs.push(Proc::start("gateway", gw_args, data)?);
    Ok(procs)
}

/// The dev.json of an earlier run of this data directory, if any; an error if that cluster had
/// another number of nodes.
fn previous_run(data: &Path, nodes: usize) -> anyhow::Result<Option<DevJson>> {
    let previous: Option<DevJson> = match std::fs::read(data.join("dev.json")) {
        Ok(bytes) => Some(serde_json::from_slice(&bytes).context("reading dev.json")?),
        Err(_) => None,
    };
    if let Some(p) = &previous {
        if p.nodes.len() != nodes {
            bail!(
                "{} holds a {}-node cluster; run with --nodes {}",
                data.display(),
                p.nodes.len(),
                p.nodes.len()
            );
        }
    }
    Ok(previous)
}

/// The cluster's private CA and the certificates of the gateway, the admin CLI and `nodes`
/// nodes, unless an earlier run made them.
fn make_certs(certs: &Path, nodes: usize) -> anyhow::Result<()> {
    if certs.join("ca.pem").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(certs)?;
    transport::certs::create_ca(certs)?;
    transport::certs::issue(certs, transport::Role::Gateway)?;
    transport::certs::issue(certs, transport::Role::Admin)?;
    for id in 1..=nodes as u64 {
        transport::certs::issue(certs, transport::Role::Node(id))?;
    }
    Ok(())
}

/// Async worker threads for each of `processes` sharing this machine: its cores divided among
/// them, at least one. A runtime with more workers than its share of the cores spends a
/// request's time waking idle workers on other cores (measured in docs/BENCHMARKS.md).
fn worker_threads_each(processes: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / processes.max(1)).max(1)
}

fn write_gateway_config(
    path: &Path,
    config: &DevConfig,
    certs: &Path,
    nodes: &[DevNode],
    threads: usize,
) -> anyhow::Result<()> {
    let mut tls = String::new();
    if config.tls {
        transport::certs::issue_https(certs, "https")?;
        tls = format!(
            "\n[tls]\ncert = {:?}\nkey = {:?}\n",
            certs.join("https.pem").display().to_string(),
            certs.join("https.key").display().to_string()
        );
    }
    let addrs: Vec<String> = nodes.iter().map(|n| format!("{:?}", n.addr.to_string())).collect();
    let text = format!(
        "# Written by sq-cloud dev.\nlisten = {:?}\ncluster_certs = {:?}\nnodes = [{}]\nworker_threads = {threads}\n{tls}",
        config.listen.to_string(),
        certs.display().to_string(),
        addrs.join(", ")
    );
    std::fs::write(path, text)?;
    Ok(())
}

/// dev.json holds the admin key: readable by its owner only.
const DEV_JSON_MODE: u32 = 0o600;

fn write_dev_json(path: &Path, dev: &DevJson) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(DEV_JSON_MODE)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(&serde_json::to_vec_pretty(dev)?)?;
    file.sync_all()?;
    // A file left by an older version keeps its mode through the rename; this one is ours.
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(DEV_JSON_MODE))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn print_banner(dev: &DevJson, json_path: &Path) {
    println!("sq-cloud dev: {} nodes and a gateway are up", dev.nodes.len());
    println!("  gateway:   {}/api/v2", dev.gateway_url);
    println!("  admin key: {}", dev.admin_key);
    println!("  demo key:  {} (tenant {})", dev.demo_key, dev.demo_tenant);
    println!("  details:   {}", json_path.display());
    println!("try: curl -H 'Authorization: Bearer {}' '{}/api/v2/update?p=hello&c=1.1.1/1.1.1/1.1.1&s=world'", dev.demo_key, dev.gateway_url);
    println!("Ctrl-C stops the cluster; run the same command again to resume.");
}

/// Whether `done` came true before `deadline`, looking every [`SUPERVISE_TICK`].
fn until(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(SUPERVISE_TICK);
    }
}

/// `step`, again while it fails for want of an answer (no connection, or a 5xx: a cluster just
/// started is still electing and winning leases) until `deadline`; a refusal (4xx) ends it.
fn until_answered<T>(
    deadline: Instant,
    mut step: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    loop {
        match step() {
            Ok(v) => return Ok(v),
            Err(e) if e.to_string().starts_with('4') || Instant::now() > deadline => return Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "the cluster is not answering yet; trying again");
                std::thread::sleep(SUPERVISE_TICK);
            }
        }
    }
}

/// How many tenants are still moving between nodes, as the cluster's health says.
fn pending_handoffs(admin: &crate::admin_client::AdminClient) -> Option<u64> {
    admin.get("/api/v2/admin/health").ok()?["handoffs"]["pending"].as_u64()
}

/// R for the bootstrap node to form a new cluster with: `--replicas` if given, else 3, or 1 for a
/// one-node cluster (which could hold only one copy). Ignored by a cluster already formed.
fn bootstrap_replicas(nodes: usize, replicas: Option<u64>) -> anyhow::Result<u8> {
    match replicas {
        Some(r) => u8::try_from(r)
            .ok()
            .filter(|r| (1..=node::config::REPLICAS_MAX).contains(r))
            .with_context(|| {
                format!("--replicas {r}: R must be 1 to {}", node::config::REPLICAS_MAX)
            }),
        None if nodes == 1 => Ok(1),
        None => Ok(node::config::DEFAULT_REPLICAS),
    }
}

/// Waits for the gateway, joins nodes 2..N, sets R if asked, and makes the demo tenant. Returns
/// the demo key.
fn bring_up(
    url: &str,
    admin_key: &str,
    nodes: &[DevNode],
    previous: Option<&DevJson>,
    data: &Path,
    replicas: Option<u64>,
) -> anyhow::Result<String> {
    let admin = crate::admin_client::AdminClient::new(url, admin_key, data.join("certs/ca.pem"))?;
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    if !until(deadline, || admin.get("/api/v2/admin/nodes").is_ok()) {
        bail!("no answer from the gateway at {url} within {STARTUP_TIMEOUT:?}");
    }
    join_nodes(&admin, nodes, deadline)?;
    if let Some(replicas) = replicas {
        until_answered(deadline, || {
            admin.post("/api/v2/admin/replicas", &serde_json::json!({ "replicas": replicas }))
        })
        .context("setting --replicas")?;
    }
    let demo_key = match previous {
        Some(p) => p.demo_key.clone(),
        None => {
            let answer = until_answered(deadline, || {
                admin.post(
                    "/api/v2/admin/tenants/add",
                    &serde_json::json!({"tenant_id": DEMO_TENANT, "tier": "pro"}),
                )
            })?;
            let key = answer["api_key"].as_str().context("the gateway answered no api_key")?;
            key.to_string()
        }
    };
    wait_until_served(url, &admin, &demo_key, data, nodes.len(), deadline)?;
    Ok(demo_key)
}

/// Joins and activates every node after the first, one at a time, each once the tenants
/// already placed have taken the one before into their sets.
fn join_nodes(
    admin: &crate::admin_client::AdminClient,
    nodes: &[DevNode],
    deadline: Instant,
) -> anyhow::Result<()> {
    for n in nodes.iter().skip(1) {
        until_answered(deadline, || {
            let listed = admin.get("/api/v2/admin/nodes")?;
            let member = listed
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x["id"] == n.id && x["state"] == "active"));
            if !member {
                let joined = admin.post(
                    "/api/v2/admin/nodes",
                    &serde_json::json!({"id": n.id, "addr": n.addr.to_string()}),
                );
                match joined {
                    // The node was started a moment ago and may not listen yet (a loaded
                    // machine): the join is refused with nothing recorded, so it is asked again.
                    Err(e) if e.to_string().contains("not reachable") => {
                        bail!("node {} does not answer yet: {e}", n.id)
                    }
                    other => {
                        other?;
                    }
                }
            }
            Ok(())
        })?;
        // Placement changes one at a time: tenants already there (a tenants file's) take the
        // joined node into their sets before the next join.
        if !until(deadline, || pending_handoffs(admin) == Some(0)) {
            bail!("tenants still moving onto node {} after {STARTUP_TIMEOUT:?}", n.id);
        }
    }
    Ok(())
}

/// Waits until the demo tenant is served and every one of the `nodes` nodes holds its lease.
fn wait_until_served(
    url: &str,
    admin: &crate::admin_client::AdminClient,
    demo_key: &str,
    data: &Path,
    nodes: usize,
    deadline: Instant,
) -> anyhow::Result<()> {
    // Ready once a tenant is served: its primary holds its node lease (a voter just started
    // grants none for a second, and a loaded machine takes longer) and has prepared it, so the
    // first reads after the banner are not answered 503. Asked again while the answer is a 5xx;
    // a 4xx (the demo tenant deleted or disabled, or its key rotated since) ends the wait too,
    // as the tenant can no longer show it.
    let demo = crate::admin_client::AdminClient::new(url, demo_key, data.join("certs/ca.pem"))?;
    let ready = "/api/v2/select?p=dev-ready&c=1.1.1/1.1.1/1.1.1";
    if !until(deadline, || demo.status_of(ready).is_ok_and(|s| s < 500)) {
        bail!("the demo tenant was not served within {STARTUP_TIMEOUT:?}");
    }
    // That shows one node holds its lease. Every node must, or a read of a tenant another one
    // leads waits a second and is answered 503 (`sq_node_reads_ready` in each node's metrics).
    let all_ready = |text: &str| {
        let ready: Vec<bool> = text
            .lines()
            .filter(|l| l.starts_with("sq_node_reads_ready{"))
            .map(|l| l.ends_with(" 1"))
            .collect();
        ready.len() >= nodes && ready.iter().all(|r| *r)
    };
    if !until(deadline, || admin.text_of("/api/v2/metrics").is_ok_and(|t| all_ready(&t))) {
        println!("note: not every node holds its lease yet; reads of some tenants may be answered 503 for a moment");
    }
    Ok(())
}

fn supervise(
    procs: &mut [Proc],
    nodes: &mut [DevNode],
    json_path: &Path,
    mut dev: DevJson,
) -> anyhow::Result<()> {
    let stop = crate::signals::install()?;
    loop {
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            println!("stopping the cluster");
            stop_all(procs);
            return Ok(());
        }
        let mut changed = false;
        for p in procs.iter_mut() {
            if let Ok(Some(status)) = p.child.try_wait() {
                if stop.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                eprintln!("{} exited ({status}); restarting it", p.name);
                std::thread::sleep(RESTART_PAUSE);
                let log_dir = json_path.parent().unwrap_or(Path::new("."));
                match Proc::start(&p.name, p.args.clone(), log_dir) {
                    Ok(fresh) => *p = fresh,
                    Err(e) => eprintln!("cannot restart {}: {e:#}", p.name),
                }
                changed = true;
            }
        }
        if changed {
            for (n, p) in nodes.iter_mut().zip(procs.iter()) {
                n.pid = p.child.id();
            }
            dev.nodes = nodes.to_vec();
            dev.gateway_pid = procs.last().map_or(0, |p| p.child.id());
            write_dev_json(json_path, &dev)?;
        }
        std::thread::sleep(SUPERVISE_TICK);
    }
}

/// SIGTERM to every child, then SIGKILL to those still running after [`STOP_GRACE`].
fn stop_all(procs: &mut [Proc]) {
    for p in procs.iter() {
        // The pid is our own child's, still unreaped, so it cannot name another process.
        unsafe { libc::kill(p.child.id() as libc::pid_t, libc::SIGTERM) };
    }
    let deadline = Instant::now() + STOP_GRACE;
    for p in procs.iter_mut() {
        while matches!(p.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(p.child.try_wait(), Ok(None)) {
            eprintln!("{} did not stop within {STOP_GRACE:?}; killing it", p.name);
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}
