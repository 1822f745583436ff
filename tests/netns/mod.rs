//! A lab of hosts for black-box tests: network namespaces made by the test, one per host, on a
//! bridge in a namespace of its own (so nothing of the host's network changes and parallel runs
//! cannot meet: every name holds the test's pid), with the `sq-cloud` processes started in
//! them. Dropping the [`Lab`] kills its processes and deletes its namespaces, on every path.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::common::{bin, tool_present, wait_for};

/// iproute2's `ip`.
pub const IP: &str = "/usr/sbin/ip";

/// The lab's subnet, /24, a private range. It exists only inside the lab's namespaces.
pub const SUBNET: &str = "10.77.0";

/// How long a started process may take to log that it is up, on a loaded machine.
pub const START_LIMIT: Duration = Duration::from_secs(30);

/// How long a process given SIGTERM may take to stop (the systemd units allow 60 s).
pub const STOP_LIMIT: Duration = Duration::from_secs(30);

/// One host's address on the lab's subnet.
pub fn ip_of(host: u8) -> String {
    format!("{SUBNET}.{host}")
}

/// Runs `ip ARGS`; its output.
pub fn ip(args: &[&str]) -> Output {
    Command::new(IP).args(args).output().unwrap_or_else(|e| panic!("{IP} {args:?}: {e}"))
}

/// Runs `ip ARGS`, which must succeed.
pub fn ip_ok(args: &[&str]) {
    let out = ip(args);
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The namespaces and processes of one run; Drop kills the processes, then deletes the
/// namespaces (the bridge and every link go with them), on every path.
pub struct Lab {
    /// Namespace names start with it: it holds the test's pid, so runs cannot collide.
    pub prefix: String,
    namespaces: Vec<String>,
    processes: BTreeMap<String, Child>,
    pub dir: tempfile::TempDir,
}

impl Lab {
    /// Makes the bridge's namespace; None (skipped) or a failure under CI when namespaces
    /// cannot be made here.
    pub fn open() -> Option<Lab> {
        let prefix = format!("sqr{}", std::process::id());
        let lan = format!("{prefix}-lan");
        let made = Path::new(IP).exists() && ip(&["netns", "add", &lan]).status.success();
        let needs = "iproute2's /usr/sbin/ip, and root to make network namespaces";
        if !tool_present("ip netns", made, needs) {
            return None;
        }
        let lab = Lab {
            prefix,
            namespaces: vec![lan.clone()],
            processes: BTreeMap::new(),
            dir: tempfile::tempdir().unwrap(),
        };
        ip_ok(&["-n", &lan, "link", "add", "br0", "type", "bridge"]);
        ip_ok(&["-n", &lan, "link", "set", "br0", "up"]);
        Some(lab)
    }

    pub fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// Makes the namespace of `host`, linked to the bridge, at `SUBNET.number`.
    pub fn add_host(&mut self, host: &str, number: u8) {
        let (ns, lan) = (self.ns(host), self.ns("lan"));
        ip_ok(&["netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        ip_ok(&[
            "-n", &lan, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        ip_ok(&["-n", &lan, "link", "set", host, "master", "br0", "up"]);
        ip_ok(&["-n", &ns, "addr", "add", &format!("{}/24", ip_of(number)), "dev", "eth0"]);
        ip_ok(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip_ok(&["-n", &ns, "link", "set", "lo", "up"]);
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Starts `sq-cloud ARGS` in `host`'s namespace as process `name`, at the systemd units'
    /// log level, its log in `name.log`.
    pub fn start(&mut self, name: &str, host: &str, args: &[&str]) {
        let log = File::create(self.path(&format!("{name}.log"))).unwrap();
        let child = Command::new(IP)
            .args(["netns", "exec", &self.ns(host), bin()])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        assert!(self.processes.insert(name.to_string(), child).is_none(), "{name} runs twice");
    }

    /// Waits until process `name` has written `needle` to its log.
    pub fn wait_log(&mut self, name: &str, needle: &str) {
        let path = self.path(&format!("{name}.log"));
        wait_for(START_LIMIT, &format!("{name} logs {needle:?}"), || {
            if let Some(status) = self.processes.get_mut(name).unwrap().try_wait().unwrap() {
                panic!("{name} exited ({status}): {}", tail(&path));
            }
            std::fs::read_to_string(&path).unwrap_or_default().contains(needle).then_some(())
        });
    }

    /// Waits until process `name` exits by itself, at most `limit`; its exit code.
    pub fn wait_exit(&mut self, name: &str, limit: Duration) -> Option<i32> {
        let child = self.processes.get_mut(name).unwrap();
        let (status, _) = wait_for(limit, &format!("{name} exits"), || child.try_wait().unwrap());
        self.processes.remove(name);
        status.code()
    }

    /// Stops process `name` as `systemctl stop` does (SIGTERM) and waits; its exit code.
    pub fn stop(&mut self, name: &str) -> Option<i32> {
        let pid = self.processes[name].id() as i32;
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        self.wait_exit(name, STOP_LIMIT)
    }

    /// Runs `sq-cloud ARGS` in `host`'s namespace with `env` to its end; success, stdout and
    /// stderr.
    pub fn run(&self, host: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
        let out = Command::new(IP)
            .args(["netns", "exec", &self.ns(host), bin()])
            .args(args)
            .current_dir(self.dir.path())
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
        (out.status.success(), text(out.stdout), text(out.stderr))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (name, child) in self.processes.iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
            if std::thread::panicking() {
                eprintln!(
                    "--- {name}.log ---\n{}",
                    tail(&self.dir.path().join(format!("{name}.log")))
                );
            }
        }
        for ns in self.namespaces.iter().rev() {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// The last lines of a log, for a failure's message.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Builds an HTTPS client whose sockets live in namespace `ns`: the thread that builds a
/// blocking client starts its I/O thread, which keeps the namespace of its creator.
pub fn client_in(ns: &str, ca_pem: &[u8]) -> reqwest::blocking::Client {
    let path = format!("/run/netns/{ns}");
    let ca = reqwest::Certificate::from_pem(ca_pem).unwrap();
    std::thread::spawn(move || {
        let handle = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let entered = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(entered, 0, "setns {path}: {}", std::io::Error::last_os_error());
        reqwest::blocking::Client::builder()
            .add_root_certificate(ca)
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    })
    .join()
    .unwrap()
}
