//! Black-box: `sq-cloud admin`, the operator's CLI over the admin API, against a dev cluster.

mod common;
mod ops_common;

use std::process::Command;
use std::time::Duration;

use common::{bin, get, DevCluster};
use ops_common::wait_for;

/// How long a change may take to reach the tenant's owner and the gateway.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `sq-cloud admin ARGS` in an empty directory (so no ./sq-cloud-dev is found by chance);
/// returns success, stdout and stderr.
fn run(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let cwd = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .arg("admin")
        .args(args)
        .current_dir(cwd.path())
        .env_remove("SQ_CLOUD_URL")
        .env_remove("SQ_CLOUD_ADMIN_KEY")
        .env_remove("RUST_BACKTRACE")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Runs `sq-cloud admin --dev DIR ARGS --json`, which must succeed, and parses its output.
fn json(cluster: &DevCluster, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["--dev", cluster.dir.to_str().unwrap()];
    all.extend_from_slice(args);
    all.push("--json");
    let (ok, out, err) = run(&all, &[]);
    assert!(ok, "admin {args:?} failed: {err}");
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("admin {args:?} printed no JSON ({e}): {out}"))
}

// Goal: every `sq-cloud admin` command (tenants add, list, stats, set, rotate-key, delete, purge;
// cluster health, nodes; the `nodes` alias) answers JSON that matches what it did to the
// cluster; the human output is a table; the gateway and key come from --dev or from
// SQ_CLOUD_URL / SQ_CLOUD_ADMIN_KEY; errors exit non-zero with the gateway's reason.
#[test]
fn admin_cli_json_and_tables() {
    let cluster = DevCluster::start(3);
    let base = cluster.url();

    let added = json(
        &cluster,
        &[
            "tenants",
            "add",
            "cli-a",
            "--tier",
            "pro",
            "--quota-mb",
            "3",
            "--email",
            "ops@example.com",
        ],
    );
    assert_eq!(
        (added["tenant_id"].as_str(), added["tier"].as_str(), added["quota_mb"].as_u64()),
        (Some("cli-a"), Some("pro"), Some(3))
    );
    assert_eq!(added["status"], "active");
    let key = added["api_key"].as_str().unwrap().to_string();
    assert!(key.starts_with("pmb-v1-") && key.len() == 39, "{key}");
    wait_for(APPLY_TIMEOUT, "the new key works", || {
        (get(&base, &key, "/update?p=d&c=1.1.1/1.1.1/1.1.1&s=x").0 == 200).then_some(())
    });

    let listed = json(&cluster, &["tenants", "list"]);
    let ids: Vec<&str> =
        listed.as_array().unwrap().iter().map(|t| t["tenant_id"].as_str().unwrap()).collect();
    assert!(ids.contains(&"cli-a") && ids.contains(&"demo"), "{ids:?}");
    // A page of one tenant at a time walks the same list, as one JSON array; filters apply.
    let paged = json(&cluster, &["tenants", "list", "--page-size", "1"]);
    let paged_ids: Vec<&str> =
        paged.as_array().unwrap().iter().map(|t| t["tenant_id"].as_str().unwrap()).collect();
    assert_eq!(paged_ids, ids);
    let pro = json(&cluster, &["tenants", "list", "--tier", "pro", "--page-size", "1"]);
    let pro_ids: Vec<&str> =
        pro.as_array().unwrap().iter().map(|t| t["tenant_id"].as_str().unwrap()).collect();
    assert_eq!(pro_ids, ["cli-a", "demo"]);
    let free = json(&cluster, &["tenants", "list", "--tier", "free"]);
    assert!(free.as_array().unwrap().iter().all(|t| t["tier"] == "free"), "{free}");

    let set = json(&cluster, &["tenants", "set", "cli-a", "--daily-limit", "7", "--quota-mb", "4"]);
    assert_eq!(
        (set["daily_limit"].as_u64(), set["quota_mb"].as_u64(), set["tier"].as_str()),
        (Some(7), Some(4), Some("pro")),
        "{set}"
    );

    let stats = json(&cluster, &["tenants", "stats", "cli-a"]);
    assert_eq!(
        (
            stats["tenant_id"].as_str(),
            stats["quota_mb"].as_u64(),
            stats["api_calls_today"].as_u64()
        ),
        (Some("cli-a"), Some(4), Some(1)),
        "{stats}"
    );
    assert!(
        (1..=3).contains(&stats["node"].as_u64().unwrap()) && stats["last_active"].is_string(),
        "{stats}"
    );
    let owner = stats["node"].as_u64().unwrap();

    let rotated = json(&cluster, &["tenants", "rotate-key", "cli-a"]);
    let new_key = rotated["api_key"].as_str().unwrap().to_string();
    assert_ne!(new_key, key);
    assert_eq!(
        get(&base, &key, "/select?p=d&c=1.1.1/1.1.1/1.1.1").0,
        401,
        "the old key still works"
    );
    wait_for(APPLY_TIMEOUT, "the rotated key works", || {
        (get(&base, &new_key, "/select?p=d&c=1.1.1/1.1.1/1.1.1") == (200, "x".into())).then_some(())
    });

    let health = json(&cluster, &["cluster", "health"]);
    assert!(
        health["raft"]["leader"].as_u64().is_some() && health["raft"]["term"].as_u64() >= Some(1),
        "{health}"
    );
    assert_eq!(health["ring"], serde_json::json!([1, 2, 3]));
    assert!(health["gossip"].as_array().unwrap().iter().all(|n| n["state"] == "alive"), "{health}");
    for args in [&["nodes"][..], &["cluster", "nodes"]] {
        let nodes = json(&cluster, args);
        assert_eq!(
            nodes.as_array().unwrap().iter().filter(|n| n["state"] == "active").count(),
            3,
            "{nodes}"
        );
    }

    // From the environment, as a table.
    let url = cluster.json["gateway_url"].as_str().unwrap().to_string();
    let env = [
        ("SQ_CLOUD_URL", url.as_str()),
        ("SQ_CLOUD_ADMIN_KEY", cluster.json["admin_key"].as_str().unwrap()),
    ];
    let (ok, table, err) = run(&["tenants", "list"], &env);
    assert!(ok, "{err}");
    let mut lines = table.lines();
    assert!(lines.next().unwrap().starts_with("TENANT  TIER"), "{table}");
    assert!(
        lines.any(|l| l.split_whitespace().collect::<Vec<_>>()[..3] == ["cli-a", "pro", "active"]),
        "{table}"
    );

    let deleted = json(&cluster, &["tenants", "delete", "cli-a"]);
    assert_eq!(deleted["status"], "archived");
    assert_eq!(
        get(&base, &new_key, "/select?p=d&c=1.1.1/1.1.1/1.1.1").0,
        403,
        "a deleted tenant's key"
    );

    // Purge: only with --yes, only an archived tenant; the owner deletes the data, the id is retired.
    let dev = cluster.dir.to_str().unwrap();
    let data = cluster.dir.join(format!("node-{owner}/store/tenants/cli-a"));
    assert!(
        data.is_dir(),
        "the archived tenant's data is kept until the purge: {}",
        data.display()
    );
    let (ok, _, err) = run(&["tenants", "purge", "cli-a", "--dev", dev], &[]);
    assert!(!ok && err.contains("--yes"), "{err}");
    let (ok, _, err) = run(&["tenants", "purge", "demo", "--yes", "--dev", dev], &[]);
    assert!(
        !ok && err.contains("409") && err.contains("archive"),
        "an active tenant was purged: {err}"
    );
    let purged = json(&cluster, &["tenants", "purge", "cli-a", "--yes"]);
    assert_eq!(
        (purged["tenant_id"].as_str(), purged["status"].as_str()),
        (Some("cli-a"), Some("purged")),
        "{purged}"
    );
    wait_for(
        APPLY_TIMEOUT + Duration::from_secs(5),
        "the owner deletes the purged tenant's data",
        || (!data.exists()).then_some(()),
    );
    assert_eq!(
        json(&cluster, &["tenants", "purge", "cli-a", "--yes"])["status"],
        "purged",
        "a repeated purge"
    );
    let (ok, _, err) = run(&["tenants", "stats", "cli-a", "--dev", dev], &[]);
    assert!(!ok && err.contains("404"), "{err}");
    let (ok, _, err) = run(&["tenants", "add", "cli-a", "--dev", dev], &[]);
    assert!(!ok && err.contains("409") && err.contains("purged"), "a purged id was reused: {err}");
    assert_eq!(
        get(&base, &new_key, "/select?p=d&c=1.1.1/1.1.1/1.1.1").0,
        401,
        "a purged tenant's key"
    );

    let (ok, _, err) =
        run(&["tenants", "stats", "no-such", "--dev", cluster.dir.to_str().unwrap()], &[]);
    assert!(!ok && err.contains("404"), "{err}");
    let (ok, _, err) = run(&["cluster", "health", "--url", &url, "--admin-key", "sqa-wrong"], &[]);
    assert!(!ok && err.contains("401"), "{err}");
    let (ok, _, err) = run(&["cluster", "health"], &[]);
    assert!(!ok && err.contains("--url"), "{err}");
}
