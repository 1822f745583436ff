//! The nemesis: one fault at a time on a `sq-cloud dev` cluster, on a seeded schedule. It kills
//! nodes (SIGKILL; the dev supervisor restarts its own, the nemesis restarts the node it
//! joined), freezes them (SIGSTOP, then SIGCONT), joins a node and drains and removes it again
//! through the admin API; with R = 3 it also wipes a node's tenant store (frozen, store deleted,
//! killed: the supervisor restarts it on an empty store). Every process it starts or stops is
//! given back on every path: a frozen node is continued and a joined node killed when the
//! nemesis is dropped.

use std::process::Child;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use crate::common::{admin, free_udp_port, pending_handoffs, start_node, wait_for, DevCluster};

/// Kills and freezes in one run; the membership changes are one join and its drain, twice.
pub const KILLS: usize = 3;
pub const PAUSES: usize = 3;
pub const MEMBERSHIP: [Fault; 4] = [Fault::Join, Fault::Drain, Fault::Join, Fault::Drain];

/// With R = 3, wipes too, among the kills, pauses, joins and drains, each only once the wiped
/// node's copies were rebuilt.
pub const WIPES: usize = 2;

/// Time between two faults, drawn in this range. A kill or a freeze ends only once its node's
/// tenants are served again, but a join returns when it is accepted: a short gap after it puts
/// the next fault in the middle of its handoffs.
pub const GAP_MS_MIN: u64 = 0;
pub const GAP_MS_MAX: u64 = 3_000;

/// How long a node stays frozen, drawn in this range: past the gateway's 1.5 s forwarding
/// bound and gossip's suspicion, so clients see timeouts and 503s, not only slow answers.
pub const PAUSE_MS_MIN: u64 = 1_000;
pub const PAUSE_MS_MAX: u64 = 3_000;

/// How long the joined node stays down when killed before the nemesis restarts it (the dev
/// supervisor restarts its own after its fixed pause).
pub const DOWN_MS_MIN: u64 = 200;
pub const DOWN_MS_MAX: u64 = 1_500;

/// How long a node may take to come back, or an admin request to be accepted (a join waits for
/// the node to listen; a drain for the join's handoffs; any of them for a registry leader).
pub const RECOVERY_LIMIT: Duration = Duration::from_secs(60);

/// How long a removed node may take to learn it and stop.
pub const REMOVED_STOP_LIMIT: Duration = Duration::from_secs(30);

/// The ids of the dev cluster's own nodes start at 1; joined nodes take the next ids (never
/// reused: the registry retires a removed node's id).
pub const DEV_NODES: u64 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Kill,
    Pause,
    Join,
    Drain,
    Wipe,
}

/// The faults of one run, in order: kills and pauses shuffled, and the membership changes, in
/// their order, at seeded positions among them.
pub fn schedule(rng: &mut StdRng) -> Vec<Fault> {
    let mut faults = vec![Fault::Kill; KILLS];
    faults.extend([Fault::Pause; PAUSES]);
    faults.shuffle(rng);
    with_membership(rng, faults)
}

/// `faults` with the membership changes, in their order, at seeded positions among them.
fn with_membership(rng: &mut StdRng, mut faults: Vec<Fault>) -> Vec<Fault> {
    let total = faults.len() + MEMBERSHIP.len();
    let mut at: Vec<usize> = (0..total).collect();
    at.shuffle(rng);
    let mut at: Vec<usize> = at[..MEMBERSHIP.len()].to_vec();
    at.sort();
    for (i, fault) in at.into_iter().zip(MEMBERSHIP) {
        faults.insert(i, fault);
    }
    faults
}

/// The faults of a run with R = 3: kills, pauses and wipes, shuffled, and the membership
/// changes at seeded positions among them (each join or drain swaps one node of the sets it
/// touches, the node leaving a set holding its copy until the node entering it is caught up).
pub fn schedule_replicated(rng: &mut StdRng) -> Vec<Fault> {
    let mut faults = vec![Fault::Kill; KILLS];
    faults.extend([Fault::Pause; PAUSES]);
    faults.extend([Fault::Wipe; WIPES]);
    faults.shuffle(rng);
    with_membership(rng, faults)
}

/// A node the nemesis started and joined.
struct Joined {
    id: u64,
    port: u16,
    child: Child,
}

pub struct Nemesis<'a> {
    cluster: &'a mut DevCluster,
    /// The test's tenants, (id, API key): kills and freezes pick among the nodes that own one.
    tenants: Vec<(String, String)>,
    joined: Option<Joined>,
    next_id: u64,
    rng: StdRng,
    /// What it did, one line per fault, with the time since it started.
    pub log: Vec<String>,
    started: Instant,
}

impl<'a> Nemesis<'a> {
    pub fn new(
        cluster: &'a mut DevCluster,
        tenants: Vec<(String, String)>,
        rng: StdRng,
    ) -> Nemesis<'a> {
        Nemesis {
            cluster,
            tenants,
            joined: None,
            next_id: DEV_NODES + 1,
            rng,
            log: Vec::new(),
            started: Instant::now(),
        }
    }

    /// Runs `faults` one after another, each after a quiet gap; then waits for the cluster to
    /// heal: every handoff done and every node alive.
    pub fn run(&mut self, faults: &[Fault]) {
        for fault in faults {
            let gap = self.rng.gen_range(GAP_MS_MIN..=GAP_MS_MAX);
            std::thread::sleep(Duration::from_millis(gap));
            let what = match fault {
                Fault::Kill => self.kill(),
                Fault::Pause => self.pause(),
                Fault::Join => self.join(),
                Fault::Drain => self.drain(),
                Fault::Wipe => self.wipe(),
            };
            let line = format!("{:>6} ms  {what}", self.started.elapsed().as_millis());
            eprintln!("nemesis: {line}");
            self.log.push(line);
        }
        self.heal();
    }

    /// A node that owns at least one of the test's tenants now (so the fault is seen by
    /// clients), and the tenants it owns.
    fn victim(&mut self) -> (u64, Vec<(String, String)>) {
        let mut owned: std::collections::BTreeMap<u64, Vec<(String, String)>> = Default::default();
        for (tenant, key) in &self.tenants {
            let path = format!("/admin/tenants/{tenant}/stats");
            let (status, stats) = admin(self.cluster, reqwest::Method::GET, &path, None);
            assert_eq!(status, 200, "stats of {tenant}: {stats}");
            let node = stats["node"].as_u64().unwrap_or_else(|| panic!("{tenant}: {stats}"));
            owned.entry(node).or_default().push((tenant.clone(), key.clone()));
        }
        let owners: Vec<u64> = owned.keys().copied().collect();
        let id = *owners.choose(&mut self.rng).expect("the test's tenants have owners");
        (id, owned.remove(&id).unwrap())
    }

    /// Waits until every tenant of `owned` is served again (a select answered).
    fn wait_served(&self, owned: &[(String, String)]) {
        for (tenant, key) in owned {
            wait_for(RECOVERY_LIMIT, &format!("{tenant} served again"), || {
                let path = "/select?p=register0&c=1.1.1/1.1.1/1.1.1";
                let answer = crate::common::http()
                    .get(format!("{}{path}", self.cluster.url()))
                    .bearer_auth(key)
                    .send()
                    .ok()?;
                (answer.status().as_u16() == 200).then_some(())
            });
        }
    }

    /// The ids of the nodes running now, dev's and the joined one.
    fn running(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = (1..=DEV_NODES).collect();
        ids.extend(self.joined.as_ref().map(|j| j.id));
        ids
    }

    fn pid(&mut self, id: u64) -> i32 {
        if let Some(j) = self.joined.as_ref().filter(|j| j.id == id) {
            return j.child.id() as i32;
        }
        self.cluster.reload_json();
        let nodes = self.cluster.json["nodes"].as_array().unwrap();
        nodes.iter().find(|n| n["id"] == id).unwrap()["pid"].as_i64().unwrap() as i32
    }

    fn kill(&mut self) -> String {
        let (id, owned) = self.victim();
        let pid = self.pid(id);
        let down = self.rng.gen_range(DOWN_MS_MIN..=DOWN_MS_MAX);
        let started = Instant::now();
        if let Some(j) = self.joined.as_mut().filter(|j| j.id == id) {
            let _ = j.child.kill();
            let _ = j.child.wait();
            std::thread::sleep(Duration::from_millis(down));
            j.child = start_node(self.cluster, j.id, j.port);
        } else {
            assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill node {id}");
            wait_for(RECOVERY_LIMIT, "the dev supervisor restarts the killed node", || {
                (self.pid(id) != pid).then_some(())
            });
        }
        self.wait_alive(id);
        self.wait_served(&owned);
        let names: Vec<&str> = owned.iter().map(|(t, _)| t.as_str()).collect();
        format!(
            "kill -9 node {id} (pid {pid}, owner of {names:?}); restarted and its tenants \
             served again after {:?}",
            started.elapsed()
        )
    }

    fn pause(&mut self) -> String {
        let (id, owned) = self.victim();
        let pid = self.pid(id);
        let frozen = Duration::from_millis(self.rng.gen_range(PAUSE_MS_MIN..=PAUSE_MS_MAX));
        {
            let _frozen = Frozen::freeze(pid);
            std::thread::sleep(frozen);
        }
        let started = Instant::now();
        self.wait_alive(id);
        self.wait_served(&owned);
        let names: Vec<&str> = owned.iter().map(|(t, _)| t.as_str()).collect();
        format!(
            "froze node {id} (pid {pid}, owner of {names:?}) for {frozen:?}; its tenants served \
             again {:?} after SIGCONT",
            started.elapsed()
        )
    }

    /// Freezes a node, deletes its tenant store, kills it; the dev supervisor restarts it on an
    /// empty store, which it rebuilds from the other copies. Returns once the test's tenants are
    /// served and every backup of theirs holds all its primary's records as a member (so the
    /// next wipe never finds a copy still being rebuilt).
    fn wipe(&mut self) -> String {
        let (id, owned) = self.victim();
        let pid = self.pid(id);
        let started = Instant::now();
        {
            let _frozen = Frozen::freeze(pid);
            let store = self.cluster.dir.join(format!("node-{id}/store/tenants"));
            std::fs::remove_dir_all(&store).expect("the tenant store deleted");
            assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill node {id}");
        }
        if let Some(j) = self.joined.as_mut().filter(|j| j.id == id) {
            let _ = j.child.wait();
            j.child = start_node(self.cluster, j.id, j.port);
        } else {
            wait_for(RECOVERY_LIMIT, "the dev supervisor restarts the wiped node", || {
                (self.pid(id) != pid).then_some(())
            });
        }
        self.wait_alive(id);
        self.wait_served(&owned);
        let served = started.elapsed();
        for (tenant, _) in self.tenants.clone() {
            wait_for(RECOVERY_LIMIT, &format!("{tenant}'s copies rebuilt"), || {
                let path = format!("/admin/tenants/{tenant}/stats");
                let (status, stats) = admin(self.cluster, reqwest::Method::GET, &path, None);
                let backups = stats["backups"].as_array()?;
                // Three while a join or drain changes the tenant's set.
                let rebuilt = status == 200
                    && backups.len() >= 2
                    && backups.iter().all(|b| b["state"] == "in-sync");
                rebuilt.then_some(())
            });
        }
        let names: Vec<&str> = owned.iter().map(|(t, _)| t.as_str()).collect();
        format!(
            "wiped node {id}'s tenant store (pid {pid}, owner of {names:?}); its tenants served \
             again after {served:?}, every copy in sync after {:?}",
            started.elapsed()
        )
    }

    fn join(&mut self) -> String {
        assert!(self.joined.is_none(), "the schedule joins one node at a time");
        let (id, port) = (self.next_id, free_udp_port());
        self.next_id += 1;
        let child = start_node(self.cluster, id, port);
        self.joined = Some(Joined { id, port, child });
        let body = serde_json::json!({"id": id, "addr": format!("127.0.0.1:{port}")});
        // Refused (nothing recorded) until the node listens, or while the drain before it
        // still has handoffs pending.
        let took = self.admin_until_accepted("POST", "/admin/nodes", Some(body));
        format!("joined node {id}; accepted after {took:?}")
    }

    fn drain(&mut self) -> String {
        let id = self.joined.as_ref().expect("the schedule drains only a joined node").id;
        let took = self.admin_until_accepted("POST", &format!("/admin/nodes/{id}/drain"), None);
        let (_, settled) = wait_for(RECOVERY_LIMIT, "the drain's handoffs end", || {
            (pending_handoffs(self.cluster) == Some(0)).then_some(())
        });
        self.admin_until_accepted("DELETE", &format!("/admin/nodes/{id}"), None);
        let mut joined = self.joined.take().unwrap();
        let (status, _) = wait_for(REMOVED_STOP_LIMIT, "the removed node stops", || {
            joined.child.try_wait().unwrap()
        });
        format!(
            "drained node {id} (accepted after {took:?}, handoffs done {settled:?} later), \
             removed it; it stopped with {status}"
        )
    }

    /// Sends an admin request until it is accepted (200); returns how long that took.
    fn admin_until_accepted(
        &mut self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Duration {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let started = Instant::now();
        loop {
            let (status, answer) = admin(self.cluster, method.clone(), path, body.clone());
            if status == 200 {
                return started.elapsed();
            }
            assert!(started.elapsed() < RECOVERY_LIMIT, "{method} {path}: still {status} {answer}");
            std::thread::sleep(crate::common::POLL_INTERVAL * 4);
        }
    }

    /// Waits until the gateway's view names node `id` alive.
    fn wait_alive(&mut self, id: u64) {
        let what = format!("node {id} alive again");
        wait_for(RECOVERY_LIMIT, &what, || {
            let (status, nodes) = admin(self.cluster, reqwest::Method::GET, "/admin/nodes", None);
            let alive = status == 200
                && nodes.as_array()?.iter().any(|n| n["id"] == id && n["health"] == "alive");
            alive.then_some(())
        });
    }

    /// Every handoff done and every node alive.
    fn heal(&mut self) {
        wait_for(RECOVERY_LIMIT, "every handoff done", || {
            (pending_handoffs(self.cluster) == Some(0)).then_some(())
        });
        for id in self.running() {
            self.wait_alive(id);
        }
    }
}

impl Drop for Nemesis<'_> {
    fn drop(&mut self) {
        if let Some(mut j) = self.joined.take() {
            let _ = j.child.kill();
            let _ = j.child.wait();
        }
    }
}

/// A process stopped with SIGSTOP, continued with SIGCONT on drop (also when the test fails).
struct Frozen(i32);

impl Frozen {
    fn freeze(pid: i32) -> Frozen {
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "SIGSTOP {pid}");
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}
