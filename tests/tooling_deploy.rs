//! deploy/ against the code: the example configs load into the real config structs and comment
//! every field, and the dashboard queries only metrics the code records.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Keys and tables set (or keys shown commented out, as `# key = …`) in a TOML file, each checked to have a
/// comment line right above it.
fn documented_keys(path: &str, text: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut previous = "";
    for line in text.lines().map(str::trim) {
        if let Some(table) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            assert!(previous.starts_with('#'), "{path}: [{table}] has no comment above it");
            keys.insert(table.to_string());
        }
        let setting = line.trim_start_matches("# ");
        let is_key = setting.split_once(" = ").is_some_and(|(k, _)| {
            !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        if is_key {
            let key = setting.split_once(" = ").map(|(k, _)| k.to_string()).unwrap_or_default();
            assert!(previous.starts_with('#'), "{path}: `{key}` has no comment above it");
            keys.insert(key);
        }
        if !line.is_empty() {
            previous = line;
        }
    }
    keys
}

/// Every key of a TOML value, nested tables included.
fn keys_of(value: &toml::Value, out: &mut BTreeSet<String>) {
    if let Some(table) = value.as_table() {
        for (k, v) in table {
            out.insert(k.clone());
            keys_of(v, out);
        }
    }
}

// Goal: deploy/node.toml is a valid node::NodeConfig that shows and explains every field the
// struct has, including optional ones.
#[test]
fn node_toml_loads_and_documents_every_field() {
    let text = read("deploy/node.toml");
    let config: node::NodeConfig =
        toml::from_str(&text).expect("deploy/node.toml loads as node::NodeConfig");
    assert!(config.bootstrap && config.admin_key_hash.as_ref().is_some_and(|h| h.len() == 64));
    let documented = documented_keys("deploy/node.toml", &text);
    let mut full = config.clone();
    full.tenants_file = Some(PathBuf::from("x"));
    full.advertise = Some(config.listen);
    let mut fields = BTreeSet::new();
    keys_of(&toml::Value::try_from(&full).expect("NodeConfig serialises"), &mut fields);
    let missing: Vec<_> = fields.difference(&documented).collect();
    assert!(missing.is_empty(), "deploy/node.toml does not show {missing:?}");
}

// Goal: deploy/gateway.toml is a valid gateway::GatewayConfig with HTTPS set, every field
// explained.
#[test]
fn gateway_toml_loads_and_documents_every_field() {
    let text = read("deploy/gateway.toml");
    let config: gateway::GatewayConfig =
        toml::from_str(&text).expect("deploy/gateway.toml loads as gateway::GatewayConfig");
    assert!(config.tls.is_some(), "a production gateway serves HTTPS");
    assert!(!config.nodes.is_empty());
    let documented = documented_keys("deploy/gateway.toml", &text);
    assert_eq!(config.http, gateway::HttpLimits::default(), "[http] shows the defaults");
    for key in [
        "listen",
        "cluster_certs",
        "nodes",
        "cert",
        "key",
        "http",
        "tls_handshake_timeout_ms",
        "header_read_timeout_ms",
        "idle_timeout_ms",
        "connections_per_address",
        "connections_max",
    ] {
        assert!(documented.contains(key), "deploy/gateway.toml does not explain {key}");
    }
}

/// Metric names (`sq_…`) that a file mentions.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (i, _) in text.match_indices("sq_") {
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let before = text[..i].chars().last();
        if before.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_')) && name.len() > 3 {
            names.insert(name);
        }
    }
    names
}

fn source_text(dirs: &[&str]) -> String {
    let mut all = String::new();
    let mut stack: Vec<PathBuf> = dirs.iter().map(|d| repo(d)).collect();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                all.push_str(&std::fs::read_to_string(&path).unwrap());
            }
        }
    }
    all
}

// Goal: every metric the Grafana dashboard and the Prometheus file name is one the node or the
// gateway records (histograms may add _bucket, _sum, _count), so no panel stays empty.
#[test]
fn dashboard_uses_real_metric_names() {
    let dashboard = read("deploy/grafana/sq-cloud-dashboard.json");
    serde_json::from_str::<serde_json::Value>(&dashboard).expect("the dashboard is JSON");
    let code = source_text(&["node/src", "gateway/src"]);
    let recorded = metric_names(&code);
    let mut used = metric_names(&dashboard);
    used.extend(metric_names(&read("deploy/prometheus/prometheus.yml")));
    assert!(used.len() >= 10, "the dashboard shows {used:?}");
    for name in used {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .fold(name.as_str(), |n, s| n.strip_suffix(s).unwrap_or(n));
        assert!(recorded.contains(base), "{name} is not a metric the code records");
    }
}

// Goal: a node or gateway configured with more async worker threads than the named limit is
// refused before it starts anything, with the limit in the message.
#[test]
fn too_many_worker_threads_are_refused_by_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (command, file) in [("node", "deploy/node.toml"), ("gateway", "deploy/gateway.toml")] {
        let text = read(file).replace("worker_threads = 0", "worker_threads = 5000");
        assert!(text.contains("worker_threads = 5000"), "{file} sets worker_threads");
        let config = dir.path().join(format!("{command}.toml"));
        std::fs::write(&config, text).expect("write config");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_sq-cloud"))
            .args([command, "--config", config.to_str().expect("UTF-8 path")])
            .output()
            .expect("run sq-cloud");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{command} started with 5000 worker threads");
        assert!(
            stderr.contains("worker_threads is 5000") && stderr.contains("at most 1024"),
            "{command}: {stderr}"
        );
    }
}
