//! Kill, freeze and wipe cycles under writes: nothing acknowledged is lost.

use super::*;

// Goal: two nodes are killed (SIGKILL) in turn under write load, the second only once the
// first is back and the tenant's backups are in sync again; each time the tenant is served
// again, every acknowledged write reads back, and after a clean stop the three copies are byte
// for byte the same.
#[test]
fn two_nodes_killed_in_turn_lose_nothing() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().expect("dir");
    let mut cluster = three_copies(tmp.path());
    let demo = cluster.demo_key();
    let (primary, load) = primary_under_load(&cluster, &demo, 5);
    let second = (1..=3).find(|&n| n != primary).expect("another node");
    for victim in [primary, second] {
        let old_pid = pid(&cluster, victim);
        let killed = Instant::now();
        unsafe { libc::kill(old_pid, libc::SIGKILL) };
        wait_for(Duration::from_secs(30), "the node restarted", || {
            cluster.reload_json();
            (pid(&cluster, victim) != old_pid).then_some(())
        });
        in_sync(&cluster, "demo", &demo);
        eprintln!(
            "node {victim} killed; back, and every copy in sync {:?} later",
            killed.elapsed()
        );
    }
    load.stop_and_read_back(&cluster, &demo);
    in_sync(&cluster, "demo", &demo);
    cluster.stop();
    same_copies(&cluster, "demo");
}

/// Fault cycles run by [`kill_freeze_and_wipe_cycles_lose_nothing`]: `SQ_CLOUD_FAULT_CYCLES`, or
/// two of each kind. docs/BENCHMARKS.md has a run of 200.
const FAULT_CYCLES_DEFAULT: usize = 6;

/// Tenants written throughout the cycles, each by its own client.
const CYCLE_TENANTS: usize = 3;

/// Each cycle writer's pause after an acknowledged write: a steady load whose documents do not
/// grow so fast that a long run measures mostly their size.
const CYCLE_WRITE_PAUSE: Duration = Duration::from_millis(10);

/// How long a frozen node stays stopped: past the lease's down time, so its tenants move.
const FREEZE_FOR: Duration = Duration::from_secs(3);

/// The fault of one cycle.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL; `sq-cloud dev` starts the node again.
    Kill,
    /// SIGSTOP for [`FREEZE_FOR`], then SIGCONT.
    Freeze,
    /// Frozen, its tenant store deleted, then SIGKILL: the node restarts on an empty store.
    Wipe,
}

/// Waits until every tenant in `tenants` (id, key) has its primary and both backups in sync,
/// within 120 s; returns how long that took.
fn all_in_sync(cluster: &DevCluster, tenants: &[(String, String)]) -> Duration {
    let started = Instant::now();
    for (tenant, key) in tenants {
        wait_for(Duration::from_secs(120), &format!("every copy of {tenant} in sync"), || {
            // The primary hears its backups at a request; one not answered yet looks again.
            let look = common::http()
                .get(format!("{}/select?p=log&c=1.1.1/1.1.1/1.1.1", cluster.url()))
                .bearer_auth(key)
                .send();
            if let Err(e) = look {
                eprintln!("a read of {tenant} while waiting for its copies: {e}");
            }
            let s = stats_now(cluster, tenant)?;
            let backups = s["backups"].as_array()?;
            let synced = backups.len() == 2
                && backups.iter().all(|b| b["state"] == "in-sync" && b["lag"] == 0);
            synced.then_some(())
        });
    }
    started.elapsed()
}

/// The median and the largest of `times`.
fn median_and_max(times: &mut [Duration]) -> (Duration, Duration) {
    times.sort();
    (
        times.get(times.len() / 2).copied().unwrap_or_default(),
        times.last().copied().unwrap_or_default(),
    )
}

// Goal: the cycles of faults with real processes. Under a write load on several tenants,
// each cycle kills, freezes or wipes one node (in turn over the nodes and the kinds), then waits
// until every tenant has all three copies in sync again before the next. Every acknowledged
// write reads back at the end, and after a clean stop the three copies of every tenant are byte
// for byte the same. Prints, per kind, the median and largest time until back in sync.
#[test]
fn kill_freeze_and_wipe_cycles_lose_nothing() {
    let cycles = std::env::var("SQ_CLOUD_FAULT_CYCLES")
        .ok()
        .map(|v| v.parse::<usize>().expect("SQ_CLOUD_FAULT_CYCLES is a number"))
        .unwrap_or(FAULT_CYCLES_DEFAULT);
    let _one = ONE_CLUSTER_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().expect("dir");
    let mut cluster = three_copies(tmp.path());
    let mut tenants = vec![("demo".to_string(), cluster.demo_key())];
    for i in 1..CYCLE_TENANTS {
        let id = format!("cycle{i}");
        let key = cluster.add_tenant(&id, serde_json::json!({"tier": "team"}));
        tenants.push((id, key));
    }
    for (tenant, key) in &tenants {
        // A long run makes more calls than a tier's daily limit allows.
        let raised = serde_json::json!({"daily_limit": 100_000_000u64});
        let (status, body) =
            admin(&cluster, Method::PATCH, &format!("/admin/tenants/{tenant}"), Some(raised));
        assert_eq!(status, 200, "{body}");
        let (status, body) = update_retrying(&cluster, key, "log", 1, "first");
        assert_eq!(status, 200, "{body}");
    }
    all_in_sync(&cluster, &tenants);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loads: Vec<Load> = tenants
        .iter()
        .map(|(_, key)| Load {
            stop: stop.clone(),
            writer: paced_writer(cluster.url(), key.clone(), stop.clone(), CYCLE_WRITE_PAUSE),
        })
        .collect();
    let mut times: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
    let started = Instant::now();
    for cycle in 0..cycles {
        // Every kind in turn; each three cycles shift the nodes by one, so nine cycles give
        // every node every kind.
        let fault = [Fault::Kill, Fault::Freeze, Fault::Wipe][cycle % 3];
        let victim = ((cycle + cycle / 3) % 3) as u64 + 1;
        let old_pid = pid(&cluster, victim);
        let at = Instant::now();
        eprintln!("cycle {cycle}: {fault:?} node {victim}, {:?} into the run", started.elapsed());
        match fault {
            Fault::Kill => unsafe {
                libc::kill(old_pid, libc::SIGKILL);
            },
            Fault::Freeze => {
                let _frozen = Frozen::freeze(&[old_pid]);
                std::thread::sleep(FREEZE_FOR);
            }
            Fault::Wipe => {
                let _frozen = Frozen::freeze(&[old_pid]);
                let store = cluster.dir.join(format!("node-{victim}/store/tenants"));
                std::fs::remove_dir_all(&store).expect("the store wiped");
                unsafe { libc::kill(old_pid, libc::SIGKILL) };
            }
        }
        if !matches!(fault, Fault::Freeze) {
            wait_for(Duration::from_secs(30), "the node restarted", || {
                cluster.reload_json();
                (pid(&cluster, victim) != old_pid).then_some(())
            });
        }
        all_in_sync(&cluster, &tenants);
        let took = at.elapsed();
        eprintln!("cycle {cycle}: {fault:?} node {victim}; every copy in sync {took:?} later");
        times.entry(format!("{fault:?}")).or_default().push(took);
    }
    for (kind, t) in &mut times {
        let (median, max) = median_and_max(t);
        eprintln!("{kind}: {} cycles, in sync again after median {median:?}, max {max:?}", t.len());
    }
    eprintln!("{cycles} cycles in {:?}", started.elapsed());
    for (load, (_, key)) in loads.into_iter().zip(&tenants) {
        load.stop_and_read_back(&cluster, key);
    }
    all_in_sync(&cluster, &tenants);
    cluster.stop();
    for (tenant, _) in &tenants {
        same_copies(&cluster, tenant);
    }
}
