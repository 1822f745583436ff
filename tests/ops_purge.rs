//! Black-box: a tenant purged while its owning node is down loses its data when that node returns.

mod common;
mod ops_common;

use std::time::Duration;

use common::{get, DevCluster};
use ops_common::{admin, node_pid, stats, wait_for, PausedSupervisor};

/// The node killed before the purge.
const VICTIM: u64 = 3;

/// Tenants made to find one owned by the victim (each node owns about a third).
const TENANTS_MAX: usize = 20;

/// How long an admin change may take: a registry election if the victim led, then the commit.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(20);

/// How long the supervisor may take to restart the node, and the node to catch up and sweep
/// (every 5 s).
const RETURN_TIMEOUT: Duration = Duration::from_secs(40);

// Goal: the purge is a registry change, so a node that was down when it was committed still
// deletes the tenant's data once it is back and has caught up, and nothing else brings the data
// back: the tenant stays unknown and its id taken.
#[test]
fn a_purge_reaches_an_owner_that_was_down() {
    let cluster = DevCluster::start(3);
    let base = cluster.url();
    let (tenant, key) = (0..TENANTS_MAX)
        .find_map(|i| {
            let id = format!("purge-{i}");
            let key = cluster.add_tenant(&id, serde_json::json!({}));
            wait_for(Duration::from_secs(10), "a write to the new tenant", || {
                (get(&base, &key, "/update?p=doc&c=1.1.1/1.1.1/1.1.1&s=secret").0 == 200)
                    .then_some(())
            });
            (stats(&cluster, &id)["node"].as_u64() == Some(VICTIM)).then_some((id, key))
        })
        .unwrap_or_else(|| panic!("none of {TENANTS_MAX} tenants is owned by node {VICTIM}"));
    let data = cluster.dir.join(format!("node-{VICTIM}/store/tenants/{tenant}"));
    assert!(data.is_dir(), "the tenant's data on its owner: {}", data.display());

    let paused = PausedSupervisor::pause(&cluster);
    assert_eq!(unsafe { libc::kill(node_pid(&cluster, VICTIM), libc::SIGKILL) }, 0);
    for (method, path) in [
        ("DELETE", format!("/admin/tenants/{tenant}")),
        ("POST", format!("/admin/tenants/{tenant}/purge")),
    ] {
        wait_for(ADMIN_TIMEOUT, &format!("{method} {path} with node {VICTIM} down"), || {
            let (status, answer) = admin(&cluster, method, &path, None);
            assert!(status == 200 || status == 503, "{method} {path}: {status} {answer}");
            (status == 200).then_some(())
        });
    }
    assert!(data.is_dir(), "nothing deleted the data while its node was down");

    drop(paused);
    wait_for(RETURN_TIMEOUT, "the returned node deletes the purged tenant's data", || {
        (!data.exists()).then_some(())
    });
    let (status, _) = admin(&cluster, "GET", &format!("/admin/tenants/{tenant}/stats"), None);
    assert_eq!(status, 404, "a purged tenant's stats");
    let (status, answer) = admin(
        &cluster,
        "POST",
        "/admin/tenants/add",
        Some(serde_json::json!({ "tenant_id": tenant })),
    );
    assert_eq!(status, 409, "re-adding a purged id: {answer}");
    assert_eq!(
        get(&base, &key, "/select?p=doc&c=1.1.1/1.1.1/1.1.1").0,
        401,
        "a purged tenant's key"
    );
}

/// Whether `/admin/health` lists a pending handoff of `tenant`; `None` while no node answers.
fn moving(cluster: &DevCluster, tenant: &str) -> Option<bool> {
    let (status, health) = admin(cluster, "GET", "/admin/health", None);
    let list = health["handoffs"]["pending_list"].as_array().filter(|_| status == 200)?;
    Some(list.iter().any(|h| h["tenant"] == tenant))
}

// Goal: purging never waits on a handoff. The owner of an archived tenant dies and is drained,
// so the tenant's handoff can never finish; the purge is still accepted at once, cancels that
// handoff in the same registry change (the tenant leaves the pending list while the node is
// still down), and once the node is back no node holds any copy of the tenant, half-received
// ones included, and every other handoff of the drain completes.
#[test]
fn a_purge_cancels_a_handoff_that_cannot_finish() {
    // One copy of each tenant: a drain of one of three nodes, and a handoff with one source.
    let cluster = DevCluster::start_with_args(3, &["--replicas", "1"]);
    let base = cluster.url();
    let tenant = (0..TENANTS_MAX)
        .find_map(|i| {
            let id = format!("moving-{i}");
            let key = cluster.add_tenant(&id, serde_json::json!({}));
            wait_for(Duration::from_secs(10), "a write to the new tenant", || {
                (get(&base, &key, "/update?p=doc&c=1.1.1/1.1.1/1.1.1&s=secret").0 == 200)
                    .then_some(())
            });
            (stats(&cluster, &id)["node"].as_u64() == Some(VICTIM)).then_some(id)
        })
        .unwrap_or_else(|| panic!("none of {TENANTS_MAX} tenants is owned by node {VICTIM}"));
    let (status, answer) = admin(&cluster, "DELETE", &format!("/admin/tenants/{tenant}"), None);
    assert_eq!(status, 200, "archive {tenant}: {answer}");

    let paused = PausedSupervisor::pause(&cluster);
    assert_eq!(unsafe { libc::kill(node_pid(&cluster, VICTIM), libc::SIGKILL) }, 0);
    wait_for(ADMIN_TIMEOUT, &format!("drain node {VICTIM} while it is down"), || {
        let (status, answer) =
            admin(&cluster, "POST", &format!("/admin/nodes/{VICTIM}/drain"), None);
        assert!(status == 200 || status == 503, "drain: {status} {answer}");
        (status == 200).then_some(())
    });
    wait_for(ADMIN_TIMEOUT, "the drain records the tenant's handoff", || {
        moving(&cluster, &tenant).filter(|m| *m)
    });
    let purge = format!("/admin/tenants/{tenant}/purge");
    let (status, answer) = admin(&cluster, "POST", &purge, None);
    assert_eq!(status, 200, "purge of a tenant whose handoff cannot finish: {answer}");
    wait_for(ADMIN_TIMEOUT, "the purge cancels the tenant's handoff", || {
        moving(&cluster, &tenant).filter(|m| !*m)
    });
    assert!(
        cluster.dir.join(format!("node-{VICTIM}/store/tenants/{tenant}")).is_dir(),
        "the down node still holds its copy"
    );

    drop(paused);
    let copies = || -> Vec<std::path::PathBuf> {
        (1..=3)
            .flat_map(|n| {
                let dir = cluster.dir.join(format!("node-{n}/store/tenants"));
                [tenant.clone(), format!(".incoming-{tenant}"), format!(".replaced-{tenant}")]
                    .map(|name| dir.join(name))
            })
            .filter(|p| p.exists())
            .collect()
    };
    wait_for(RETURN_TIMEOUT, "no node holds any copy of the purged tenant", || {
        copies().is_empty().then_some(())
    });
    wait_for(RETURN_TIMEOUT, "the drain's other handoffs complete", || {
        (common::pending_handoffs(&cluster) == Some(0)).then_some(())
    });
    assert!(copies().is_empty(), "a finished drain brought back a copy: {:?}", copies());
}
