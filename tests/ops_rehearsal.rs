//! Black-box: deploy/OPERATIONS.md rehearsed on five hosts (tests/netns): three nodes, a fourth
//! joined later, a gateway and the operator's workstation, each a network namespace of its own
//! on one bridge. Certificates come from the real `sq-cloud certs`, configs from deploy/node.toml
//! and deploy/gateway.toml with the fields the guide says to change, and the steps are the
//! guide's: bootstrap over HTTPS, join, add a node, drain and remove one, rotate the admin key
//! through the tenants file; then health, metrics and every tenant's data.
//!
//! Needs `ip netns` (iproute2) and the right to make namespaces (root): without them the test
//! is skipped with a loud line, and fails under `CI=true`.

mod common;
mod netns;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{bin, wait_for};
use netns::{client_in, ip_of, tail, Lab};

/// The gateway's host number on the lab's subnet, and the workstation's.
const GATEWAY_HOST: u8 = 10;
const WORKSTATION_HOST: u8 = 20;

/// The nodes' QUIC port, as in deploy/node.toml.
const NODE_PORT: u16 = 7100;

/// How long a change may take to reach every node and the gateway on a loaded machine.
const STEP_LIMIT: Duration = Duration::from_secs(30);

/// How long a removed node may take to learn it and exit.
const REMOVED_EXIT_LIMIT: Duration = Duration::from_secs(30);

/// A shell line of OPERATIONS.md, run as written; its output without the final newline.
fn shell(line: &str, env: &[(&str, &str)]) -> String {
    let out = Command::new("sh").args(["-c", line]).envs(env.iter().copied()).output().unwrap();
    assert!(out.status.success(), "{line}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim_end().to_string()
}

/// A new admin key and its SHA-256, made with bootstrap step 2's lines.
fn new_admin_key() -> (String, String) {
    let key = shell(
        r#"ADMIN_KEY="sqa-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"; echo "$ADMIN_KEY""#,
        &[],
    );
    let hash =
        shell(r#"printf %s "$ADMIN_KEY" | sha256sum | cut -d' ' -f1"#, &[("ADMIN_KEY", &key)]);
    assert!(key.len() == 36 && hash.len() == 64, "{key} {hash}");
    (key, hash)
}

/// `sq-cloud certs ARGS` on the workstation's disk (it needs no network).
fn certs(args: &[&str]) {
    let out = Command::new(bin()).arg("certs").args(args).output().unwrap();
    assert!(out.status.success(), "certs {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Copies `files` from the CA directory into a machine's certificate directory, keys 0600.
fn install_certs(ca_dir: &Path, to: &Path, files: &[&str]) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(to).unwrap();
    for f in files {
        std::fs::copy(ca_dir.join(f), to.join(f)).unwrap_or_else(|e| panic!("copy {f}: {e}"));
        if f.ends_with(".key") {
            std::fs::set_permissions(to.join(f), std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }
}

/// `template` (a deploy/*.toml) with each `key = …` line of `set` replaced (an empty value
/// deletes the line); every key must be found.
fn configure(template: &str, set: &[(&str, String)]) -> String {
    let mut found = vec![false; set.len()];
    let mut out = String::new();
    for line in template.lines() {
        let hit = set.iter().position(|(k, _)| {
            line.strip_prefix(k).is_some_and(|rest| rest.trim_start().starts_with('='))
        });
        match hit {
            Some(i) => {
                found[i] = true;
                if !set[i].1.is_empty() {
                    out.push_str(&format!("{} = {}\n", set[i].0, set[i].1));
                }
            }
            None => out.push_str(&format!("{line}\n")),
        }
    }
    let missing: Vec<_> = set.iter().zip(&found).filter(|(_, f)| !**f).map(|(s, _)| s.0).collect();
    assert!(missing.is_empty(), "not in the template: {missing:?}");
    out
}

/// What the operator exports (OPERATIONS.md's `SQ_CLOUD_*` variables), and an HTTPS client
/// that lives in the workstation's namespace and trusts the cluster CA (`curl --cacert`).
struct Operator {
    url: String,
    admin_key: String,
    ca: String,
    http: reqwest::blocking::Client,
}

impl Operator {
    /// `METHOD /api/v2PATH` with `key`; status and answer (JSON when it parses).
    fn call(
        &self,
        method: reqwest::Method,
        key: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut request = self.http.request(method, format!("{}/api/v2{path}", self.url));
        request = request.bearer_auth(key);
        if let Some(body) = body {
            request = request.body(body.to_string());
        }
        match request.send() {
            Ok(r) => {
                let status = r.status().as_u16();
                let text = r.text().unwrap_or_default();
                (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
            }
            Err(e) => (0, serde_json::Value::String(e.to_string())),
        }
    }

    fn admin(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        self.call(method, &self.admin_key, path, body)
    }

    /// A tenant's GET of `path`; status and the body's bytes.
    fn tenant_get(&self, key: &str, path: &str, query: &[(&str, &str)]) -> (u16, Vec<u8>) {
        let r = self
            .http
            .get(format!("{}/api/v2{path}", self.url))
            .query(query)
            .bearer_auth(key)
            .send()
            .unwrap();
        (r.status().as_u16(), r.bytes().unwrap().to_vec())
    }

    /// `sq-cloud ARGS` on the workstation, with the environment OPERATIONS.md exports.
    fn cli(&self, lab: &Lab, args: &[&str]) -> (bool, String, String) {
        let env = [
            ("SQ_CLOUD_URL", self.url.as_str()),
            ("SQ_CLOUD_ADMIN_KEY", self.admin_key.as_str()),
            ("SQ_CLOUD_CA", self.ca.as_str()),
        ];
        lab.run("ws", args, &env)
    }

    /// Health, once it shows exactly `voters`, alive, as active voters, one leader and no
    /// pending handoff.
    fn healthy(&self, voters: &[u64]) -> serde_json::Value {
        let (health, _) = wait_for(STEP_LIMIT, &format!("health shows voters {voters:?}"), || {
            let (status, health) = self.admin("GET", "/admin/health", None);
            let members: Vec<u64> = health["nodes"]
                .as_array()?
                .iter()
                .filter(|n| {
                    n["state"] == "active" && n["raft"] == "voter" && n["health"] == "alive"
                })
                .filter_map(|n| n["id"].as_u64())
                .collect();
            let others_out = health["nodes"]
                .as_array()?
                .iter()
                .all(|n| voters.contains(&n["id"].as_u64().unwrap_or(0)) || n["raft"] == "none");
            let led = health["raft"]["leader"].as_u64().is_some_and(|l| voters.contains(&l));
            let settled = health["handoffs"]["pending"] == 0;
            (status == 200 && members == voters && others_out && led && settled).then_some(health)
        });
        health
    }
}

/// A node's files: its node.toml made from deploy/node.toml as bootstrap step 3 says.
fn node_config(lab: &Lab, id: u64, admin_key_hash: Option<&str>) -> PathBuf {
    let home = lab.path(&format!("node-{id}"));
    let template = std::fs::read_to_string("deploy/node.toml").unwrap();
    let q = |p: PathBuf| format!("{:?}", p.display().to_string());
    let config = configure(
        &template,
        &[
            ("id", id.to_string()),
            ("data_dir", q(home.join("data"))),
            ("advertise", format!("\"{}:{NODE_PORT}\"", ip_of(id as u8))),
            ("cluster_certs", q(home.join("certs"))),
            ("bootstrap", (id == 1).to_string()),
            ("admin_key_hash", admin_key_hash.map(|h| format!("\"{h}\"")).unwrap_or_default()),
        ],
    );
    std::fs::create_dir_all(home.join("data")).unwrap();
    std::fs::write(home.join("node.toml"), config).unwrap();
    home.join("node.toml")
}

/// Issues node `id`'s certificate, installs it on its machine, writes its node.toml and starts
/// it in its own namespace; waits for `node listening` (bootstrap step 4).
fn start_new_node(lab: &mut Lab, ca_dir: &Path, id: u64, admin_key_hash: Option<&str>) {
    certs(&["issue", "--dir", ca_dir.to_str().unwrap(), "--node", &id.to_string()]);
    let (pem, key) = (format!("node-{id}.pem"), format!("node-{id}.key"));
    install_certs(ca_dir, &lab.path(&format!("node-{id}/certs")), &["ca.pem", &pem, &key]);
    let config = node_config(lab, id, admin_key_hash);
    lab.add_host(&format!("n{id}"), id as u8);
    start_node(lab, id, &config);
}

fn start_node(lab: &mut Lab, id: u64, config: &Path) {
    let name = format!("node-{id}");
    lab.start(&name, &format!("n{id}"), &["node", "--config", config.to_str().unwrap()]);
    lab.wait_log(&name, "node listening");
}

/// The documents each tenant writes before the membership changes: (name, scrolls).
fn documents(i: usize) -> Vec<(String, Vec<(String, String)>)> {
    (0..2)
        .map(|d| {
            let scrolls = (1..=3)
                .map(|s| {
                    let coord = format!("1.1.{}/1.{s}.1/1.1.{s}", d + 1);
                    (
                        coord,
                        format!(
                            "tenant {i}, document {d}, scroll {s}: ünïcödé ✓ {}",
                            "x".repeat(i * 97 + s)
                        ),
                    )
                })
                .collect();
            (format!("doc{d}"), scrolls)
        })
        .collect()
}

/// A tenant and the documents it wrote, as `get` answered them.
struct Tenant {
    id: String,
    key: String,
    docs: BTreeMap<String, Vec<u8>>,
}

/// Bootstrap step 1: the CA, the gateway's QUIC certificate and its public HTTPS certificate
/// for its IP address, installed on the gateway. Returns the CA directory.
fn certificates(lab: &Lab) -> PathBuf {
    let ca_dir = lab.path("cluster-ca");
    let dir = ca_dir.to_str().unwrap();
    certs(&["init", "--dir", dir]);
    certs(&["issue", "--dir", dir, "--gateway"]);
    let gateway_ip = ip_of(GATEWAY_HOST);
    certs(&["issue", "--dir", dir, "--https", "--name", "sq.example.net", "--name", &gateway_ip]);
    let files = ["ca.pem", "gateway.pem", "gateway.key", "https.pem", "https.key"];
    install_certs(&ca_dir, &lab.path("gateway/certs"), &files);
    ca_dir
}

/// Bootstrap step 5: gateway.toml from deploy/gateway.toml, the gateway started, and the
/// operator's workstation; waits until the gateway answers for node 1.
fn start_gateway(lab: &mut Lab, ca_dir: &Path, admin_key: &str) -> Operator {
    let certs = lab.path("gateway/certs");
    let seeds: Vec<String> = (1..=3).map(|id| format!("\"{}:{NODE_PORT}\"", ip_of(id))).collect();
    let q = |p: PathBuf| format!("{:?}", p.display().to_string());
    let config = configure(
        &std::fs::read_to_string("deploy/gateway.toml").unwrap(),
        &[
            ("cluster_certs", q(certs.clone())),
            ("nodes", format!("[{}]", seeds.join(", "))),
            ("cert", q(certs.join("https.pem"))),
            ("key", q(certs.join("https.key"))),
        ],
    );
    let path = lab.path("gateway/gateway.toml");
    std::fs::write(&path, config).unwrap();
    lab.add_host("gw", GATEWAY_HOST);
    lab.start("gateway", "gw", &["gateway", "--config", path.to_str().unwrap()]);
    lab.add_host("ws", WORKSTATION_HOST);
    let op = Operator {
        url: format!("https://{}", ip_of(GATEWAY_HOST)),
        admin_key: admin_key.to_string(),
        ca: ca_dir.join("ca.pem").display().to_string(),
        http: client_in(&lab.ns("ws"), &std::fs::read(ca_dir.join("ca.pem")).unwrap()),
    };
    op.healthy(&[1]);
    op
}

/// Bootstrap steps 2 to 6: the admin key, nodes 1 to 3, the gateway, then nodes 2 and 3
/// joined one at a time.
fn bootstrap(lab: &mut Lab, ca_dir: &Path) -> Operator {
    let (admin_key, admin_key_hash) = new_admin_key();
    for id in 1..=3 {
        start_new_node(lab, ca_dir, id, (id == 1).then_some(admin_key_hash.as_str()));
    }
    let op = start_gateway(lab, ca_dir, &admin_key);
    for id in [2u64, 3] {
        let addr = format!("{}:{NODE_PORT}", ip_of(id as u8));
        let body = serde_json::json!({"id": id, "addr": addr});
        // A node not yet reachable is refused with 409 and nothing is recorded: ask again.
        wait_for(STEP_LIMIT, &format!("node {id} joins"), || {
            let (status, answer) = op.admin("POST", "/admin/nodes", Some(body.clone()));
            assert!(status != 400 && status != 401, "join of node {id}: {status} {answer}");
            if status != 200 {
                eprintln!("join of node {id}: {status} {answer}");
            }
            (status == 200).then_some(())
        });
    }
    op.healthy(&[1, 2, 3]);
    op
}

/// Bootstrap step 7, for five tenants: each writes its documents, which are read back.
fn write_tenants(op: &Operator) -> Vec<Tenant> {
    let mut tenants = Vec::new();
    for (i, tier) in ["free", "pro", "pro", "free", "pro"].iter().enumerate() {
        let id = format!("acme{i}");
        let body = serde_json::json!({"tenant_id": id, "tier": tier});
        let (status, added) = op.admin("POST", "/admin/tenants/add", Some(body));
        assert_eq!(status, 201, "{added}");
        let key = added["api_key"].as_str().unwrap().to_string();
        let mut docs = BTreeMap::new();
        for (name, scrolls) in documents(i) {
            for (coord, text) in &scrolls {
                let query = [("p", name.as_str()), ("c", coord.as_str()), ("s", text.as_str())];
                wait_for(STEP_LIMIT, &format!("{id} writes {name}"), || {
                    (op.tenant_get(&key, "/update", &query).0 == 200).then_some(())
                });
            }
            let (status, bytes) = op.tenant_get(&key, "/get", &[("p", &name)]);
            assert_eq!(status, 200);
            let whole = String::from_utf8_lossy(&bytes).to_string();
            for (_, text) in &scrolls {
                assert!(whole.contains(text.as_str()), "{id}/{name} lacks {text:?}");
            }
            docs.insert(name, bytes);
        }
        tenants.push(Tenant { id, key, docs });
    }
    tenants
}

/// Every tenant's documents read back byte for byte. A 503 is asked again: right after a node
/// restarts, a tenant's primary may still be winning its lease or preparing, and a client asks
/// again after a 503's Retry-After; any other refusal fails.
fn check_data(op: &Operator, tenants: &[Tenant], when: &str) {
    for Tenant { id, key, docs } in tenants {
        for (name, bytes) in docs {
            let (got, _) = wait_for(STEP_LIMIT, &format!("{id}/{name} {when}: answered"), || {
                match op.tenant_get(key, "/get", &[("p", name)]) {
                    (200, got) => Some(got),
                    (503, _) => None,
                    (status, _) => panic!("{id}/{name} {when}: {status}"),
                }
            });
            assert!(
                got == *bytes,
                "{id}/{name} {when}: {} bytes, not the {} written",
                got.len(),
                bytes.len()
            );
        }
    }
}

/// "Add a node", with the CLI: node 4 until it is an active voter and nothing is pending.
fn add_node_4(lab: &mut Lab, op: &Operator, ca_dir: &Path) {
    start_new_node(lab, ca_dir, 4, None);
    let address = format!("{}:{NODE_PORT}", ip_of(4));
    let (added, _) = wait_for(STEP_LIMIT, "nodes add 4", || {
        let (ok, out, err) = op.cli(lab, &["admin", "nodes", "add", "4", &address]);
        assert!(ok || err.contains("not reachable"), "{err}");
        ok.then_some(out)
    });
    let row = added.lines().find(|l| l.starts_with("4 ")).unwrap_or_default();
    assert!(row.contains("active") && row.contains("voter"), "{added}");
    op.healthy(&[1, 2, 3, 4]);
}

/// "Remove a node", steps 1 to 5, for node 2 with the CLI: drained until no handoff is pending,
/// removed; it exits with status 10 by itself; its data archived, its address out of the
/// gateway's seeds; it leaves the gateway's metrics.
fn remove_node_2(lab: &mut Lab, op: &Operator) {
    let (ok, out, err) = op.cli(lab, &["admin", "nodes", "drain", "2"]);
    assert!(ok && err.contains("handoffs pending: 0"), "{out}{err}");
    let (status, nodes) = op.admin("GET", "/admin/nodes", None);
    let two = nodes.as_array().unwrap().iter().find(|n| n["id"] == 2).cloned().unwrap();
    assert!(status == 200 && two["handoffs_out"] == 0 && two["tenants"] == 0, "{nodes}");
    let (ok, out, err) = op.cli(lab, &["admin", "nodes", "remove", "2"]);
    assert!(ok, "{out}{err}");
    let code = lab.wait_exit("node-2", REMOVED_EXIT_LIMIT);
    assert_eq!(code, Some(node::EXIT_REMOVED), "the removed node's exit status");
    let log = lab.path("node-2.log");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("this node was removed from the cluster"), "{}", tail(&log));
    let home = lab.path("node-2");
    let archive =
        r#"tar -C "$HOME_DIR" -czf "$HOME_DIR/../node-2.tar.gz" data && rm -r "$HOME_DIR/data""#;
    shell(archive, &[("HOME_DIR", home.to_str().unwrap())]);
    let config = lab.path("gateway/gateway.toml");
    let seeds = std::fs::read_to_string(&config).unwrap();
    let without = seeds.replace(&format!("\"{}:{NODE_PORT}\", ", ip_of(2)), "");
    assert_ne!(seeds, without, "node 2 is not in the gateway's nodes");
    std::fs::write(&config, without).unwrap();
    wait_for(STEP_LIMIT, "node 2 leaves /api/v2/metrics", || {
        let (status, text) = op.admin("GET", "/metrics", None);
        let text = text.as_str().unwrap_or_default().to_string();
        let up = text.contains("sq_node_up{node=\"4\"} 1");
        (status == 200 && !text.contains("node=\"2\"") && up).then_some(())
    });
    op.healthy(&[1, 3, 4]);
}

/// "Rotate the admin key": a new key's hash in every node's tenants file, `tenants_file`
/// uncommented in each node.toml and the nodes restarted one at a time; the old key is then
/// refused and the new one works, and neither is on any disk of the lab.
fn rotate_admin_key(lab: &mut Lab, op: &mut Operator) {
    let (new_key, new_hash) = new_admin_key();
    let old_key = std::mem::replace(&mut op.admin_key, new_key.clone());
    for id in [1u64, 3, 4] {
        write_tenants_file(lab, id, &new_hash);
        assert_eq!(lab.stop(&format!("node-{id}")), Some(0), "node {id} stops cleanly");
        let config = lab.path(&format!("node-{id}/node.toml"));
        start_node(lab, id, &config);
        // Either key may be the cluster's while the restarts go on.
        wait_for(STEP_LIMIT, &format!("the cluster healthy after node {id}'s restart"), || {
            [&new_key, &old_key].iter().find_map(|key| {
                op.admin_key = key.to_string();
                let (status, health) = op.admin("GET", "/admin/health", None);
                let alive = health["nodes"].as_array().map_or(0, |n| {
                    n.iter().filter(|n| n["raft"] == "voter" && n["health"] == "alive").count()
                });
                (status == 200 && alive == 3 && health["raft"]["leader"].is_u64()).then_some(())
            })
        });
    }
    op.admin_key = new_key.clone();
    wait_for(STEP_LIMIT, "the new admin key works", || {
        (op.admin("GET", "/admin/nodes", None).0 == 200).then_some(())
    });
    op.admin_key = old_key.clone();
    assert_eq!(op.admin("GET", "/admin/nodes", None).0, 401, "the old admin key still works");
    op.admin_key = new_key.clone();
    let (ok, _, err) = op.cli(lab, &["admin", "cluster", "health"]);
    assert!(ok, "the CLI with the new key: {err}");
    for key in [&old_key, &new_key] {
        let holders = files_holding(lab.dir.path(), key.as_bytes());
        assert!(holders.is_empty(), "an admin key in plain text on disk: {holders:?}");
    }
}

/// Rotation step 2 on node `id`: tenants.json with the hash only, mode 0600, and `tenants_file`
/// uncommented in its node.toml (deploy/node.toml carries the line commented out).
fn write_tenants_file(lab: &Lab, id: u64, hash: &str) {
    use std::os::unix::fs::PermissionsExt;
    let home = lab.path(&format!("node-{id}"));
    let file = home.join("tenants.json");
    std::fs::write(&file, format!("{{\"admin_key_hash\": \"{hash}\", \"tenants\": []}}\n"))
        .unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = home.join("node.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let commented = "# tenants_file = \"/etc/sq-cloud/tenants.json\"";
    assert!(text.contains(commented), "node.toml lacks {commented}");
    let line = format!("tenants_file = {:?}", file.display().to_string());
    std::fs::write(&config, text.replace(commented, &line)).unwrap();
}

/// The end: health shows nodes 1, 3 and 4 active, alive voters and node 2 removed; the metrics
/// name no node 2 and every other node up; every tenant's data as written.
fn final_checks(op: &Operator, tenants: &[Tenant]) {
    let health = op.healthy(&[1, 3, 4]);
    let two = health["nodes"].as_array().unwrap().iter().find(|n| n["id"] == 2).cloned();
    assert!(two.is_some_and(|n| n["state"] == "removed" && n["raft"] == "none"), "{health}");
    // A scrape gives each node one forward timeout: on a loaded machine a node may miss one,
    // so the scrape is taken again until every node answers it.
    let (text, _) = wait_for(STEP_LIMIT, "a scrape every node answers", || {
        let (status, text) = op.admin("GET", "/metrics", None);
        let text = text.as_str().unwrap_or_default().to_string();
        assert!(status == 200 && !text.contains("node=\"2\""), "node 2 in the metrics");
        let all_up =
            [1, 3, 4].iter().all(|id| text.contains(&format!("sq_node_up{{node=\"{id}\"}} 1")));
        all_up.then_some(text)
    });
    for id in [1, 3, 4] {
        let up = format!("sq_node_up{{node=\"{id}\"}} 1");
        assert!(text.contains(&up), "node {id} not up: {text}");
    }
    check_data(op, tenants, "at the end");
    let docs = tenants.iter().flat_map(|t| t.docs.values());
    let (count, bytes) = docs.fold((0, 0), |(n, b), doc| (n + 1, b + doc.len()));
    eprintln!("{count} documents, {bytes} bytes, read back byte for byte; health: {health}");
}

// Goal: an operator who follows OPERATIONS.md on separate hosts (namespaces) gets a working
// cluster over HTTPS with certificates from `sq-cloud certs` only; joins nodes 2, 3 and later 4;
// drains node 2 until no handoff is pending and removes it, after which it exits with status 10
// by itself and leaves the gateway's metrics; rotates the admin key through the tenants file
// without the key touching a node (the old key is then refused, the new one works); and finds
// health showing the voters alive and every tenant's documents byte for byte as written.
#[test]
fn operations_guide_on_five_hosts() {
    let started = Instant::now();
    let Some(mut lab) = Lab::open() else { return };
    let step = |what: &str| eprintln!("[{:>5.1} s] {what}", started.elapsed().as_secs_f64());
    step("bootstrap: certificates, nodes 1-3, the gateway, nodes 2 and 3 joined");
    let ca_dir = certificates(&lab);
    let mut op = bootstrap(&mut lab, &ca_dir);
    step("bootstrap: tenants and their documents");
    let tenants = write_tenants(&op);
    step("add node 4 (sq-cloud admin nodes add)");
    add_node_4(&mut lab, &op, &ca_dir);
    check_data(&op, &tenants, "after node 4 joined");
    step("remove node 2: drain until no handoff is pending, then remove");
    remove_node_2(&mut lab, &op);
    check_data(&op, &tenants, "after node 2 was removed");
    step("rotate the admin key through the tenants file, one node restart at a time");
    rotate_admin_key(&mut lab, &mut op);
    step("health, metrics and every tenant's data");
    final_checks(&op, &tenants);
    step("done");
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_holding(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else if std::fs::read(&path)
                .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            {
                found.push(path);
            }
        }
    }
    found
}
