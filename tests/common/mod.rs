//! Shared helpers for the black-box tests: start the real `sq-cloud` binary, talk HTTP to it,
//! and stop everything when the test ends, whatever happens.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Pause between two looks at a condition in [`wait_for`], the one poll helper of these tests.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Polls `look` until it gives a value or `limit` passes (then the test fails naming `what`).
/// Returns the value and how long it took.
pub fn wait_for<T>(
    limit: Duration,
    what: &str,
    mut look: impl FnMut() -> Option<T>,
) -> (T, Duration) {
    let start = Instant::now();
    loop {
        if let Some(v) = look() {
            return (v, start.elapsed());
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Whether a test may use a tool it needs (`available`). Under `CI=true` a missing tool fails
/// the test: `.ci/run` installs every tool (`install` says how). Elsewhere the test is skipped
/// with a loud line on stderr, which the harness does not capture.
pub fn tool_present(tool: &str, available: bool, install: &str) -> bool {
    if available {
        return true;
    }
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    assert!(!in_ci, "{tool} is missing, and CI=true needs it: {install}");
    // Straight to stderr, past the test harness's capture of print macros: a skip must show.
    let line =
        format!("\n*** SKIPPED: {tool} is missing ({install}); this test checked nothing ***\n");
    let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
    false
}

/// How long a dev cluster may take to write dev.json.
pub const CLUSTER_START_TIMEOUT: Duration = Duration::from_secs(90);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_sq-cloud")
}

/// A TCP port free on loopback now, for a test's gateway: below the kernel's ephemeral range
/// (`transport::ports`), so no other process's outgoing connection takes it first.
pub fn free_tcp_port() -> u16 {
    transport::free_loopback_port(|p| TcpListener::bind(("127.0.0.1", p)).is_ok())
        .expect("a free TCP port on loopback")
}

/// A `sq-cloud dev` process; SIGTERM and wait on drop, SIGKILL if it does not stop.
pub struct DevCluster {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub json: serde_json::Value,
    pub nodes: usize,
    pub listen: String,
    /// Every node said it may answer reads by the time dev said the cluster was up.
    pub reads_ready: bool,
    _tmp: Option<tempfile::TempDir>,
}

impl DevCluster {
    pub fn start(nodes: usize) -> DevCluster {
        DevCluster::start_with_args(nodes, &[])
    }

    /// [`DevCluster::start`] with more arguments for `sq-cloud dev`.
    pub fn start_with_args(nodes: usize, extra: &[&str]) -> DevCluster {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let listen = format!("127.0.0.1:{}", free_tcp_port());
        let mut c = DevCluster::start_with(&dir, nodes, &listen, extra);
        c._tmp = Some(tmp);
        c
    }

    pub fn start_in(dir: &Path, nodes: usize, listen: &str) -> DevCluster {
        DevCluster::start_with(dir, nodes, listen, &[])
    }

    /// Like [`DevCluster::start_in`], with more `sq-cloud dev` arguments.
    pub fn start_with(dir: &Path, nodes: usize, listen: &str, extra: &[&str]) -> DevCluster {
        let _ = std::fs::remove_file(dir.join("dev.json.ready"));
        let previous = std::fs::read(dir.join("dev.json")).ok();
        let child = Command::new(bin())
            .args([
                "dev",
                "--nodes",
                &nodes.to_string(),
                "--data",
                dir.to_str().unwrap(),
                "--listen",
                listen,
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start sq-cloud dev");
        let mut cluster = DevCluster {
            child: Some(child),
            dir: dir.to_path_buf(),
            json: serde_json::Value::Null,
            nodes,
            listen: listen.to_string(),
            reads_ready: false,
            _tmp: None,
        };
        cluster.wait_ready(previous);
        cluster
    }

    /// Waits until dev prints its banner line "details:", which it does after writing dev.json.
    /// Before it, dev waits for every node to say it may answer reads (`sq_node_reads_ready`:
    /// a read sent to a node still without its lease is answered 503), and prints a note if
    /// they did not: [`DevCluster::reads_ready`] says whether it did.
    fn wait_ready(&mut self, _previous: Option<Vec<u8>>) {
        use std::io::BufRead;
        let stdout = self.child.as_mut().unwrap().stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reads_ready = true;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("not every node holds its lease") {
                    reads_ready = false;
                }
                if line.contains("details:") {
                    let _ = tx.send(reads_ready);
                }
            }
        });
        match rx.recv_timeout(CLUSTER_START_TIMEOUT) {
            Ok(ready) => self.reads_ready = ready,
            Err(_) => {
                // The directory goes with the test: what the processes logged is printed here.
                self.print_log_tails();
                panic!("sq-cloud dev did not come up in time");
            }
        }
        self.json =
            serde_json::from_slice(&std::fs::read(self.dir.join("dev.json")).unwrap()).unwrap();
    }

    /// Prints the end of every process's log (`<dir>/node-N.log`, `<dir>/gateway.log`) to
    /// stderr: a failed start's cause, before its temporary directory is deleted.
    fn print_log_tails(&self) {
        const LINES: usize = 60;
        let mut logs: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        logs.retain(|p| p.extension().is_some_and(|x| x == "log"));
        logs.sort();
        for path in logs {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- last {LINES} lines of {} ---", path.display());
            for line in &lines[lines.len().saturating_sub(LINES)..] {
                eprintln!("{line}");
            }
        }
    }

    pub fn url(&self) -> String {
        format!("{}/api/v2", self.json["gateway_url"].as_str().unwrap())
    }

    pub fn admin_key(&self) -> String {
        self.json["admin_key"].as_str().unwrap().to_string()
    }

    pub fn demo_key(&self) -> String {
        self.json["demo_key"].as_str().unwrap().to_string()
    }

    /// Re-reads dev.json (pids change when the supervisor restarts a child).
    pub fn reload_json(&mut self) {
        self.json =
            serde_json::from_slice(&std::fs::read(self.dir.join("dev.json")).unwrap()).unwrap();
    }

    /// Stops the cluster with SIGTERM, as Ctrl-C would, and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }

    /// Adds a tenant through the admin API and returns its key.
    pub fn add_tenant(&self, id: &str, extra: serde_json::Value) -> String {
        let mut body = serde_json::json!({ "tenant_id": id });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        let r = http()
            .post(format!("{}/admin/tenants/add", self.url()))
            .bearer_auth(self.admin_key())
            .json(&body)
            .send()
            .unwrap();
        assert!(r.status().is_success(), "add tenant {id}: {}", r.status());
        let v: serde_json::Value = r.json().unwrap();
        v["api_key"].as_str().unwrap().to_string()
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(10)).build().unwrap()
}

/// How many times [`get`] sends a request again whose outcome the cluster could not tell.
const UNKNOWN_OUTCOME_RETRIES: usize = 3;

/// GET `path` (relative to /api/v2) with a Bearer key; returns status and body.
///
/// A 503 saying the request's outcome is unknown (its backups did not confirm it within the
/// node's replication wait, e.g. while the machine's other work stalls the disk) is sent again
/// after its Retry-After, as an SQ client does, at most [`UNKNOWN_OUTCOME_RETRIES`] times; each
/// retry is printed. Every other answer is returned as it came.
pub fn get(base: &str, key: &str, path: &str) -> (u16, String) {
    let mut retries = 0;
    loop {
        let r = http().get(format!("{base}{path}")).bearer_auth(key).send().unwrap();
        let status = r.status().as_u16();
        let wait = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .unwrap_or(1);
        let body = r.text().unwrap();
        if status != 503
            || !body.contains("outcome is unknown")
            || retries == UNKNOWN_OUTCOME_RETRIES
        {
            return (status, body);
        }
        retries += 1;
        eprintln!("{path}: {body}; sending it again in {wait} s");
        std::thread::sleep(Duration::from_secs(wait));
    }
}

/// Runs the recorded conformance cases against `base` with `key`; returns failures as text.
pub fn run_conformance(base: &str, key: &str, cases: &serde_json::Value) -> (usize, Vec<String>) {
    let client = http();
    let mut passed = 0;
    let mut failures = Vec::new();
    for case in cases.as_array().unwrap() {
        for (i, step) in case["steps"].as_array().unwrap().iter().enumerate() {
            let method =
                reqwest::Method::from_bytes(step["method"].as_str().unwrap().as_bytes()).unwrap();
            let mut req =
                client.request(method, format!("{base}{}", step["path"].as_str().unwrap()));
            match step["auth"].as_str().unwrap_or("bearer") {
                "bearer" => req = req.header("Authorization", format!("Bearer {key}")),
                "raw" => req = req.header("Authorization", key),
                "x-sq-api-key" => req = req.header("X-SQ-API-Key", key),
                _ => {}
            }
            if let Some(h) = step["headers"].as_object() {
                for (k, v) in h {
                    req = req.header(k, v.as_str().unwrap());
                }
            }
            if let Some(b) = step["body"].as_str() {
                req = req.body(b.to_string());
            }
            let r = req.send().unwrap();
            let status = r.status().as_u16();
            let cors = r
                .headers()
                .get("access-control-allow-origin")
                .map(|v| v.to_str().unwrap().to_string());
            let body = r.bytes().unwrap().to_vec();
            let mut why = Vec::new();
            if status as u64 != step["status"].as_u64().unwrap() {
                why.push(format!("status {status} != {}", step["status"]));
            }
            if let Some(e) = step["expect"].as_str() {
                if body != e.as_bytes() {
                    why.push(format!("body {:?} != {:?}", String::from_utf8_lossy(&body), e));
                }
            }
            if let Some(e) = step["expect_prefix"].as_str() {
                if !body.starts_with(e.as_bytes()) {
                    why.push(format!(
                        "body {:?} lacks prefix {e:?}",
                        String::from_utf8_lossy(&body)
                    ));
                }
            }
            if let Some(c) = step["cors"].as_str() {
                if cors.as_deref() != Some(c) {
                    why.push(format!("cors {cors:?} != {c:?}"));
                }
            }
            if why.is_empty() {
                passed += 1;
            } else {
                failures.push(format!("{} step {i}: {}", case["name"], why.join("; ")));
            }
        }
    }
    (passed, failures)
}

/// How long the handoffs of one placement change may take in all, on a loaded CI machine.
pub const SETTLE_LIMIT: Duration = Duration::from_secs(120);

pub fn admin(
    c: &DevCluster,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut r = http().request(method, format!("{}{path}", c.url())).bearer_auth(c.admin_key());
    if let Some(b) = body {
        r = r.json(&b);
    }
    let r = r.send().unwrap();
    let status = r.status().as_u16();
    let text = r.text().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
}

/// `sq-cloud admin --dev DIR ARGS` against `c`; returns success, stdout and stderr.
pub fn admin_cli(c: &DevCluster, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin())
        .args(["admin", "--dev", c.dir.to_str().unwrap()])
        .args(args)
        .env_remove("SQ_CLOUD_URL")
        .env_remove("SQ_CLOUD_ADMIN_KEY")
        .output()
        .unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (out.status.success(), text(out.stdout), text(out.stderr))
}

pub fn start_node(c: &DevCluster, id: u64, port: u16) -> Child {
    let certs = c.dir.join("certs");
    if !certs.join(format!("node-{id}.pem")).exists() {
        let ok = Command::new(bin())
            .args(["certs", "issue", "--dir", certs.to_str().unwrap(), "--node", &id.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }
    let dir = c.dir.join(format!("node-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = format!(
        "id = {id}\ndata_dir = {:?}\nlisten = \"127.0.0.1:{port}\"\ncluster_certs = {:?}\n",
        dir.display().to_string(),
        certs.display().to_string()
    );
    std::fs::write(dir.join("node.toml"), config).unwrap();
    let log = std::fs::File::create(c.dir.join(format!("node-{id}.log"))).unwrap();
    Command::new(bin())
        .args(["node", "--config", dir.join("node.toml").to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn pending_handoffs(c: &DevCluster) -> Option<u64> {
    let (status, health) = admin(c, reqwest::Method::GET, "/admin/health", None);
    (status == 200).then(|| health["handoffs"]["pending"].as_u64()).flatten()
}

pub fn node_counts(c: &DevCluster) -> BTreeMap<u64, (String, u64)> {
    let (_, nodes) = admin(c, reqwest::Method::GET, "/admin/nodes", None);
    nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["id"].as_u64().unwrap(),
                (n["state"].as_str().unwrap().to_string(), n["tenants"].as_u64().unwrap()),
            )
        })
        .collect()
}

pub fn settle(c: &DevCluster, what: &str) -> Duration {
    let started = Instant::now();
    loop {
        if pending_handoffs(c) == Some(0) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < SETTLE_LIMIT,
            "{what}: handoffs still pending after {SETTLE_LIMIT:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
