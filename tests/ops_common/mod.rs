//! Helpers for the operations tests (tests/ops_*.rs): admin calls, metrics samples, bounded
//! polling, a second gateway process, and pausing the dev supervisor.
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub use crate::common::wait_for;
use crate::common::{bin, free_tcp_port, http, DevCluster};

/// How long a started process may take to answer its first request.
pub const PROCESS_START_TIMEOUT: Duration = Duration::from_secs(30);

/// An admin request by method name; returns the status and the answer ([`crate::common::admin`]).
pub fn admin(
    cluster: &DevCluster,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    crate::common::admin(
        cluster,
        reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
        path,
        body,
    )
}

/// A tenant's stats, which must be answered.
pub fn stats(cluster: &DevCluster, tenant: &str) -> serde_json::Value {
    let (status, v) = admin(cluster, "GET", &format!("/admin/tenants/{tenant}/stats"), None);
    assert_eq!(status, 200, "stats of {tenant}: {v}");
    v
}

/// The cluster's `/api/v2/metrics` text.
pub fn metrics(cluster: &DevCluster) -> String {
    let response = http()
        .get(format!("{}/metrics", cluster.url()))
        .bearer_auth(cluster.admin_key())
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    response.text().unwrap()
}

/// The sum of every sample of `name` whose labels include all of `labels`, and how many there
/// were.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> (f64, usize) {
    let mut sum = 0.0;
    let mut count = 0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let (series_name, label_text) = match series.find('{') {
            Some(i) => (&series[..i], &series[i..]),
            None => (series, ""),
        };
        let has = |k: &str, v: &str| {
            label_text.contains(&format!("{{{k}=\"{v}\""))
                || label_text.contains(&format!(",{k}=\"{v}\""))
        };
        if series_name == name && labels.iter().all(|(k, v)| has(k, v)) {
            sum += value.parse::<f64>().unwrap_or_else(|_| panic!("bad sample {line:?}"));
            count += 1;
        }
    }
    (sum, count)
}

/// How many lines of the cluster's node logs contain `needle`.
pub fn node_log_lines(dir: &Path, needle: &str) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with("node-") && name.ends_with(".log") {
            n += std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(needle))
                .count();
        }
    }
    n
}

/// A second `sq-cloud gateway` process on the dev cluster's nodes; killed on drop.
pub struct SecondGateway {
    child: Child,
    /// Its `/api/v2` base.
    pub url: String,
}

impl SecondGateway {
    /// Starts it from a copy of the dev cluster's gateway.toml with another `listen` port, and
    /// waits until it serves `key`.
    pub fn start(cluster: &DevCluster, key: &str) -> SecondGateway {
        SecondGateway::start_with(cluster, key, "")
    }

    /// [`SecondGateway::start`], with `more` (whole TOML tables, such as `[http]`) after the
    /// copied settings.
    pub fn start_with(cluster: &DevCluster, key: &str, more: &str) -> SecondGateway {
        SecondGateway::start_limited(cluster, key, more, None)
    }

    /// [`SecondGateway::start_with`], the process started with the open-file limit
    /// `(soft, hard)` when given.
    pub fn start_limited(
        cluster: &DevCluster,
        key: &str,
        more: &str,
        open_files: Option<(u64, u64)>,
    ) -> SecondGateway {
        let port = free_tcp_port();
        let mut config: String = std::fs::read_to_string(cluster.dir.join("gateway.toml"))
            .unwrap()
            .lines()
            .map(|l| {
                if l.starts_with("listen") {
                    format!("listen = \"127.0.0.1:{port}\"\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        config.push_str(more);
        let path = cluster.dir.join("gateway-2.toml");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(cluster.dir.join("gateway-2.log")).unwrap();
        let mut command = Command::new(bin());
        command.args(["gateway", "--config", path.to_str().unwrap()]);
        command.stdout(Stdio::null()).stderr(log);
        if let Some((soft, hard)) = open_files {
            let limit = libc::rlimit { rlim_cur: soft, rlim_max: hard };
            // SAFETY: between fork and exec the closure only calls setrlimit, which is
            // async-signal-safe, on a struct it owns.
            unsafe {
                command.pre_exec(move || match libc::setrlimit(libc::RLIMIT_NOFILE, &limit) {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                });
            }
        }
        let child = command.spawn().unwrap();
        let gateway = SecondGateway { child, url: format!("http://127.0.0.1:{port}/api/v2") };
        wait_for(PROCESS_START_TIMEOUT, "the second gateway serves the tenant", || {
            let r = http().get(format!("{}/version", gateway.url)).bearer_auth(key).send().ok()?;
            (r.status().as_u16() == 200).then_some(())
        });
        gateway
    }
}

impl SecondGateway {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for SecondGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Stops the `sq-cloud dev` supervisor (SIGSTOP) so a killed child stays down; continues it
/// on drop, also when the test fails, so the cluster can still be stopped cleanly.
pub struct PausedSupervisor(i32);

impl PausedSupervisor {
    pub fn pause(cluster: &DevCluster) -> PausedSupervisor {
        let pid = cluster.child.as_ref().unwrap().id() as i32;
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        PausedSupervisor(pid)
    }
}

impl Drop for PausedSupervisor {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// The pid dev.json gives node `id`.
pub fn node_pid(cluster: &DevCluster, id: u64) -> i32 {
    cluster.json["nodes"].as_array().unwrap().iter().find(|n| n["id"] == id).unwrap()["pid"]
        .as_i64()
        .unwrap() as i32
}
