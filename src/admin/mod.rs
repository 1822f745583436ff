//! `sq-cloud admin`: tenants and nodes from the shell, through the gateway's admin API
//! (PRODUCT.md §2). Human tables by default; `--json` prints the gateway's JSON answer as it
//! came, for scripts.
//!
//! Where the gateway is and the admin key come from, first to last: `--url` / `--admin-key`;
//! `--dev DIR` (that dev cluster's dev.json); `SQ_CLOUD_URL` / `SQ_CLOUD_ADMIN_KEY`; and, when
//! none of these is given, `./sq-cloud-dev/dev.json` if it exists (what `sq-cloud dev` writes).

use std::path::{Path, PathBuf};

use anyhow::bail;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::admin_client::AdminClient;
use crate::tooling::{encode_query_value, Target};

mod render;

use render::{aligned, cell, human, node_table, rows_of};

/// The data directory `sq-cloud dev` uses when given none; `admin` looks there last.
const DEFAULT_DEV_DIR: &str = "sq-cloud-dev";

#[derive(Args)]
pub struct AdminArgs {
    /// Gateway URL, e.g. https://phext.io [env: SQ_CLOUD_URL]
    #[arg(long, global = true)]
    url: Option<String>,
    /// The admin key [env: SQ_CLOUD_ADMIN_KEY]
    #[arg(long, global = true)]
    admin_key: Option<String>,
    /// Talk to the dev cluster in DIR (reads DIR/dev.json).
    #[arg(long, global = true, value_name = "DIR")]
    dev: Option<PathBuf>,
    /// A CA certificate (PEM) to trust for HTTPS [env: SQ_CLOUD_CA]
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
    /// Print the gateway's JSON answer instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Add, list, inspect, change, re-key and delete tenants.
    #[command(subcommand)]
    Tenants(TenantsCommand),
    /// The cluster's health and nodes.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// The cluster's nodes: list them (the default, same as `cluster nodes`), add, drain or
    /// remove one. Changes show their progress until done.
    Nodes {
        #[command(subcommand)]
        command: Option<NodesCommand>,
    },
}

#[derive(Subcommand)]
enum NodesCommand {
    /// Every node with its state, health, part in Raft and tenant count.
    List,
    /// Join a running node (started with bootstrap = false) and wait until it is an active voter
    /// and no handoff is pending.
    Add {
        id: u64,
        /// Its QUIC address as other nodes reach it, e.g. 10.0.0.4:7100.
        addr: String,
        /// Answer as soon as the join is accepted, without waiting for the handoffs.
        #[arg(long)]
        no_wait: bool,
    },
    /// Move a node's tenants to the others and wait until no handoff is pending.
    Drain {
        id: u64,
        #[arg(long)]
        no_wait: bool,
    },
    /// Remove a drained node (or cancel a join that never finishes). The node stops by itself.
    Remove { id: u64 },
}

#[derive(Subcommand)]
enum TenantsCommand {
    /// Add a tenant; prints its key, which is shown only this once.
    Add {
        id: String,
        /// free, pro or team (default free).
        #[arg(long)]
        tier: Option<String>,
        /// Override the tier's storage quota, in MB.
        #[arg(long)]
        quota_mb: Option<u64>,
        #[arg(long)]
        email: Option<String>,
    },
    /// List every tenant, a page at a time as the gateway answers them (any number of
    /// tenants; the output starts with the first page).
    List {
        /// Only tenants of this tier: free, pro or team.
        #[arg(long)]
        tier: Option<String>,
        /// Only tenants in this state: active, disabled or archived.
        #[arg(long)]
        status: Option<String>,
        /// Only tenants this node owns.
        #[arg(long)]
        node: Option<u64>,
        /// Tenants asked for per request (1 to 10,000).
        #[arg(long, default_value_t = 1_000)]
        page_size: u64,
    },
    /// Storage, quota and today's usage of a tenant.
    Stats { id: String },
    /// Change a tenant's tier, quota, daily request limit, or enabled state.
    Set {
        id: String,
        /// free, pro or team; resets quota and daily limit to the tier's unless also given.
        #[arg(long)]
        tier: Option<String>,
        #[arg(long)]
        quota_mb: Option<u64>,
        /// Requests per UTC day.
        #[arg(long)]
        daily_limit: Option<u64>,
        #[arg(long, conflicts_with = "disable")]
        enable: bool,
        #[arg(long)]
        disable: bool,
    },
    /// Give a tenant a new key; the old one stops working within 1 s.
    RotateKey { id: String },
    /// Disable a tenant and archive its data (nothing is destroyed).
    Delete { id: String },
    /// Write the registry's tenants as a tenants file (key hashes only, never keys) to stdout:
    /// JSON, or with `--phext` one scroll per tenant, as the ranch mesh keeps it.
    Export {
        /// The phext form instead of JSON.
        #[arg(long)]
        phext: bool,
    },
    /// Destroy an archived tenant: its data is deleted on every node, its id never reused.
    Purge {
        id: String,
        /// Required: purging cannot be undone.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Gossip state of every node, the Raft leader, term and commit index, the ring.
    Health,
    /// Every node with its state, health and tenant count.
    Nodes,
    /// Set R, how many nodes hold each tenant (1 to 5; a write waits for a majority of them).
    /// Once there are tenants it moves by one at a time; a raise adds a copy of every tenant,
    /// caught up while it serves. Shows its progress until no tenant's set change is pending.
    Replicas {
        replicas: u64,
        /// Answer as soon as R is set, without waiting for the sets' changes.
        #[arg(long)]
        no_wait: bool,
    },
}

/// How an answer is shown to a person.
#[derive(Clone, Copy)]
enum Shape {
    Added,
    Tenant,
    Stats,
    Rotated,
    Deleted,
    Purged,
    Health,
    Nodes,
}

pub fn run(args: AdminArgs) -> anyhow::Result<()> {
    let client = connect(&args)?;
    if let AdminCommand::Nodes { command: Some(change) } = &args.command {
        if !matches!(change, NodesCommand::List) {
            return node_change(&client, change, args.json);
        }
    }
    if let AdminCommand::Cluster(ClusterCommand::Replicas { replicas, no_wait }) = &args.command {
        return replicas_change(&client, *replicas, !no_wait, args.json);
    }
    if let AdminCommand::Tenants(TenantsCommand::List { tier, status, node, page_size }) =
        &args.command
    {
        let filter = PageQuery { tier: tier.clone(), status: status.clone(), node: *node };
        return list_tenants(&client, &filter, *page_size, args.json);
    }
    if let AdminCommand::Tenants(TenantsCommand::Export { phext }) = &args.command {
        let mut all = Vec::new();
        pages(&client, &PageQuery::default(), EXPORT_PAGE_SIZE, |page| {
            all.extend(page.as_array().into_iter().flatten().cloned());
            Ok(())
        })?;
        let file = tenants_file(&Value::Array(all))?;
        if *phext {
            use std::io::Write;
            std::io::stdout().write_all(&node::tenants_file::phext::write(&file))?;
        } else {
            println!("{}", serde_json::to_string_pretty(&node::tenants_file::to_json(&file))?);
        }
        return Ok(());
    }
    let (answer, shape) = execute(&client, &args.command)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        print!("{}", human(shape, &answer));
    }
    Ok(())
}

fn connect(args: &AdminArgs) -> anyhow::Result<AdminClient> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let (mut url, mut key) = (args.url.clone(), args.admin_key.clone());
    let mut dev = args.dev.clone();
    if dev.is_none() {
        url = url.or_else(|| env("SQ_CLOUD_URL"));
        key = key.or_else(|| env("SQ_CLOUD_ADMIN_KEY"));
        let fallback = Path::new(DEFAULT_DEV_DIR);
        if (url.is_none() || key.is_none()) && fallback.join("dev.json").exists() {
            dev = Some(fallback.to_path_buf());
        }
    }
    if url.is_none() && dev.is_none() {
        bail!("no gateway: give --url, SQ_CLOUD_URL or --dev DIR");
    }
    let target = Target::resolve(dev.as_deref(), url, key, args.ca.clone())?;
    let Some(key) = target.admin_key.as_deref() else {
        bail!("no admin key: give --admin-key, SQ_CLOUD_ADMIN_KEY or --dev DIR");
    };
    AdminClient::new(&target.url, key, target.ca.clone().unwrap_or_default())
}

fn tenant_path(id: &str) -> String {
    format!("/api/v2/admin/tenants/{}", encode_query_value(id))
}

fn execute(client: &AdminClient, command: &AdminCommand) -> anyhow::Result<(Value, Shape)> {
    Ok(match command {
        AdminCommand::Tenants(TenantsCommand::Add { id, tier, quota_mb, email }) => {
            let body =
                json!({"tenant_id": id, "tier": tier, "quota_mb": quota_mb, "admin_email": email});
            (client.post("/api/v2/admin/tenants/add", &without_nulls(body))?, Shape::Added)
        }
        AdminCommand::Tenants(TenantsCommand::List { .. }) => {
            bail!("list streams its pages; it is handled before this")
        }
        AdminCommand::Tenants(TenantsCommand::Stats { id }) => {
            (client.get(&format!("{}/stats", tenant_path(id)))?, Shape::Stats)
        }
        AdminCommand::Tenants(TenantsCommand::Set {
            id,
            tier,
            quota_mb,
            daily_limit,
            enable,
            disable,
        }) => {
            let enabled = match (enable, disable) {
                (true, _) => Some(true),
                (_, true) => Some(false),
                _ => None,
            };
            let body = without_nulls(
                json!({"tier": tier, "quota_mb": quota_mb, "daily_limit": daily_limit, "enabled": enabled}),
            );
            if body.as_object().is_some_and(|o| o.is_empty()) {
                bail!("nothing to change: give --tier, --quota-mb, --daily-limit, --enable or --disable");
            }
            (client.patch(&tenant_path(id), &body)?, Shape::Tenant)
        }
        AdminCommand::Tenants(TenantsCommand::RotateKey { id }) => {
            (client.post(&format!("{}/rotate-key", tenant_path(id)), &json!({}))?, Shape::Rotated)
        }
        AdminCommand::Tenants(TenantsCommand::Delete { id }) => {
            (client.delete(&tenant_path(id))?, Shape::Deleted)
        }
        AdminCommand::Tenants(TenantsCommand::Export { .. }) => {
            bail!("export writes a file, not a table; it is handled before this")
        }
        AdminCommand::Tenants(TenantsCommand::Purge { id, yes }) => {
            if !yes {
                bail!("purging tenant {id} destroys its data and cannot be undone; add --yes to go on");
            }
            (client.post(&format!("{}/purge", tenant_path(id)), &json!({}))?, Shape::Purged)
        }
        AdminCommand::Cluster(ClusterCommand::Health) => {
            (client.get("/api/v2/admin/health")?, Shape::Health)
        }
        AdminCommand::Cluster(ClusterCommand::Nodes) | AdminCommand::Nodes { .. } => {
            (client.get("/api/v2/admin/nodes")?, Shape::Nodes)
        }
        AdminCommand::Cluster(ClusterCommand::Replicas { .. }) => {
            unreachable!("a change of R is run by replicas_change")
        }
    })
}

/// Tenants per request of `tenants export`: the largest page the API gives.
const EXPORT_PAGE_SIZE: u64 = 10_000;

/// Which tenants a listing asks for.
#[derive(Default)]
struct PageQuery {
    tier: Option<String>,
    status: Option<String>,
    node: Option<u64>,
}

/// Asks for every page of the tenant listing in turn, handing each to `each` as it arrives.
fn pages(
    client: &AdminClient,
    query: &PageQuery,
    page_size: u64,
    mut each: impl FnMut(&Value) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut after: Option<String> = None;
    loop {
        let mut path = format!("/api/v2/admin/tenants?limit={page_size}");
        let params = [
            ("after", after.clone()),
            ("tier", query.tier.clone()),
            ("status", query.status.clone()),
            ("node", query.node.map(|n| n.to_string())),
        ];
        for (name, value) in params {
            if let Some(v) = value {
                path.push_str(&format!("&{name}={}", encode_query_value(&v)));
            }
        }
        let (page, next) = client.get_page(&path)?;
        each(&page)?;
        match next {
            Some(n) if Some(&n) != after.as_ref() => after = Some(n),
            _ => return Ok(()),
        }
    }
}

/// `tenants list`: pages printed as they arrive, as one table (or one JSON array with --json).
fn list_tenants(
    client: &AdminClient,
    query: &PageQuery,
    page_size: u64,
    json_out: bool,
) -> anyhow::Result<()> {
    use std::io::Write;
    let columns = ["tenant_id", "tier", "status", "quota_mb", "daily_limit", "admin_email"];
    let headers = ["TENANT", "TIER", "STATUS", "QUOTA_MB", "DAILY_LIMIT", "EMAIL"];
    let out = std::io::stdout();
    let mut out = out.lock();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    let mut first = true;
    if json_out {
        write!(out, "[")?;
    }
    pages(client, query, page_size, |page| {
        let items = page.as_array().map(Vec::as_slice).unwrap_or_default();
        if json_out {
            for item in items {
                let sep = if first { "\n  " } else { ",\n  " };
                write!(out, "{sep}{}", serde_json::to_string(item)?)?;
                first = false;
            }
        } else {
            let rows = rows_of(page, &columns);
            // The first page sets the columns; a later, wider cell only pushes its row right.
            if first {
                for row in &rows {
                    for (w, c) in widths.iter_mut().zip(row) {
                        *w = (*w).max(c.chars().count());
                    }
                }
                write!(out, "{}", aligned(&[headers.map(str::to_string).to_vec()], &widths))?;
                first = false;
            }
            write!(out, "{}", aligned(&rows, &widths))?;
        }
        out.flush()?;
        Ok(())
    })?;
    if json_out {
        writeln!(out, "{}]", if first { "" } else { "\n" })?;
    }
    Ok(())
}

/// The tenants file of the admin API's tenant list: archived tenants left out (they cannot sign
/// in), and the admin key left out (the API never shows it, not even hashed).
fn tenants_file(list: &Value) -> anyhow::Result<node::tenants_file::TenantsFile> {
    let mut tenants = Vec::new();
    for t in list.as_array().map(Vec::as_slice).unwrap_or_default() {
        if t["status"] == "archived" {
            continue;
        }
        let id = t["tenant_id"].as_str().unwrap_or_default().to_string();
        let hashes: Vec<&str> =
            t["key_hashes"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        let [hash] = hashes.as_slice() else {
            bail!("tenant {id}: expected one key hash from the gateway, got {}", hashes.len());
        };
        tenants.push(node::tenants_file::FileTenant {
            id,
            key_hash: hash.to_string(),
            tier: t["tier"].as_str().map(str::to_string),
            quota_mb: t["quota_mb"].as_u64(),
            daily_limit: t["daily_limit"].as_u64(),
            enabled: t["status"] == "active",
            admin_email: t["admin_email"].as_str().map(str::to_string),
            created_at_ms: t["created_at_ms"].as_u64(),
        });
    }
    Ok(node::tenants_file::TenantsFile { admin_key_hash: None, tenants })
}

/// The object without its null fields: the admin API takes absent fields as "unchanged".
fn without_nulls(mut value: Value) -> Value {
    if let Some(o) = value.as_object_mut() {
        o.retain(|_, v| !v.is_null());
    }
    value
}

/// How often a node change's progress is polled.
const PROGRESS_POLL: std::time::Duration = std::time::Duration::from_millis(500);
/// How long a node change's progress is followed before the tool gives up waiting (the change
/// itself goes on in the cluster; `admin cluster health` shows it).
const PROGRESS_LIMIT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// Where a node change stands, from one health answer.
fn progress(health: &Value, id: u64) -> (String, u64) {
    let node = health["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["id"].as_u64() == Some(id)))
        .cloned()
        .unwrap_or(Value::Null);
    let pending = health["handoffs"]["pending"].as_u64().unwrap_or(0);
    let line = format!(
        "node {id}: {}, {}, raft {}; handoffs pending: {pending}",
        cell(&node["state"]),
        cell(&node["health"]),
        cell(&node["raft"])
    );
    (line, pending)
}

/// Sets R, then, if `wait`, prints each change of its progress (the tenants whose replica set
/// still changes) until none is pending, and shows the cluster's health.
fn replicas_change(
    client: &AdminClient,
    replicas: u64,
    wait: bool,
    json: bool,
) -> anyhow::Result<()> {
    let mut health = client.post("/api/v2/admin/replicas", &json!({ "replicas": replicas }))?;
    let started = std::time::Instant::now();
    let mut last = String::new();
    if wait {
        loop {
            let pending = health["handoffs"]["pending"].as_u64().unwrap_or(0);
            let line = format!(
                "R = {}: replica set changes pending: {pending}; under-replicated tenants: {}",
                cell(&health["replicas"]),
                cell(&health["under_replicated"])
            );
            if line != last {
                eprintln!("{line}");
                last = line;
            }
            if pending == 0 {
                break;
            }
            if started.elapsed() > PROGRESS_LIMIT {
                bail!("R = {replicas}: changes still pending after {PROGRESS_LIMIT:?}; they go on in the cluster (admin cluster health)");
            }
            std::thread::sleep(PROGRESS_POLL);
            health = client.get("/api/v2/admin/health")?;
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&health)?);
    } else {
        print!("{}", human(Shape::Health, &health));
    }
    Ok(())
}

/// Adds, drains or removes a node, printing each change of its progress until it is done.
fn node_change(client: &AdminClient, change: &NodesCommand, json: bool) -> anyhow::Result<()> {
    let (id, wait, done_state) = match change {
        NodesCommand::Add { id, addr, no_wait } => {
            client.post("/api/v2/admin/nodes", &json!({"id": id, "addr": addr}))?;
            (*id, !no_wait, "active")
        }
        NodesCommand::Drain { id, no_wait } => {
            client.post(&format!("/api/v2/admin/nodes/{id}/drain"), &json!({}))?;
            (*id, !no_wait, "draining")
        }
        NodesCommand::Remove { id } => {
            client.delete(&format!("/api/v2/admin/nodes/{id}"))?;
            (*id, false, "removed")
        }
        NodesCommand::List => unreachable!("listing is no change"),
    };
    let started = std::time::Instant::now();
    let mut last = String::new();
    loop {
        let health = client.get("/api/v2/admin/health")?;
        let (line, pending) = progress(&health, id);
        if line != last {
            eprintln!("{line}");
            last = line;
        }
        let state = health["nodes"]
            .as_array()
            .and_then(|nodes| nodes.iter().find(|n| n["id"].as_u64() == Some(id)))
            .map(|n| cell(&n["state"]))
            .unwrap_or_default();
        if state == "removed" && done_state != "removed" {
            bail!("node {id} was removed while the change was under way");
        }
        if !wait || (state == done_state && pending == 0) {
            if json {
                println!("{}", serde_json::to_string_pretty(&health["nodes"])?);
            } else {
                print!("{}", node_table(&health["nodes"]));
            }
            if done_state == "removed" {
                eprintln!("node {id} is removed and stops by itself: disable its service, take its address out of every config, archive its data directory");
            }
            return Ok(());
        }
        if started.elapsed() > PROGRESS_LIMIT {
            bail!("node {id}: still not done after {PROGRESS_LIMIT:?}; the change goes on in the cluster (admin cluster health)");
        }
        std::thread::sleep(PROGRESS_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: unset options never reach the API as nulls.
    #[test]
    fn nulls_are_dropped() {
        assert_eq!(without_nulls(json!({"tier": null, "quota_mb": 5})), json!({"quota_mb": 5}));
    }
}
