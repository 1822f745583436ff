//! The human form of the admin API's answers: aligned tables, one line per pair, and the
//! progress of rebuilds.

use serde_json::Value;

use super::Shape;

pub(super) fn human(shape: Shape, v: &Value) -> String {
    match shape {
        Shape::Added => format!(
            "added tenant {} ({}, quota {} MB)\napi key: {}\nThe key is shown only this once; store it now.\n",
            cell(&v["tenant_id"]),
            cell(&v["tier"]),
            cell(&v["quota_mb"]),
            cell(&v["api_key"])
        ),
        Shape::Rotated => format!(
            "new api key for {}: {}\nThe old key stops working within 1 s; the new one is shown only this once.\n",
            cell(&v["tenant_id"]),
            cell(&v["api_key"])
        ),
        Shape::Deleted => format!("tenant {} is {}: disabled, its data kept.\n", cell(&v["tenant_id"]), cell(&v["status"])),
        Shape::Purged => format!("tenant {} is {}: its data is deleted on every node, its id retired.\n", cell(&v["tenant_id"]), cell(&v["status"])),
        Shape::Tenant => pairs(v, &["tenant_id", "tier", "status", "quota_mb", "daily_limit", "admin_email"]),
        Shape::Stats => stats(v),
        Shape::Health => health(v),
        Shape::Nodes => node_table(v),
    }
}

fn stats(v: &Value) -> String {
    let used_mb = v["storage_used_mb"].as_f64().unwrap_or(0.0);
    let quota_mb = v["quota_mb"].as_f64().unwrap_or(0.0);
    let percent = if quota_mb > 0.0 { used_mb * 100.0 / quota_mb } else { 0.0 };
    let rows = vec![
        vec!["tenant".into(), cell(&v["tenant_id"])],
        vec!["tier".into(), cell(&v["tier"])],
        vec!["node".into(), cell(&v["node"])],
        vec!["replica set".into(), cell(&v["replica_set"])],
        vec!["last record".into(), cell(&v["last_lsn"])],
        vec!["storage".into(), format!("{used_mb:.3} MB of {quota_mb} MB ({percent:.1}%)")],
        vec!["api calls today".into(), cell(&v["api_calls_today"])],
        vec!["bytes out today".into(), cell(&v["bytes_out_today"])],
        vec!["last active".into(), cell(&v["last_active"])],
    ];
    let mut rows = rows;
    for b in v["backups"].as_array().into_iter().flatten() {
        let lag = match b["lag"].as_u64() {
            Some(lag) => format!("{lag} records behind"),
            None => "not heard from yet".into(),
        };
        rows.push(vec![
            format!("backup {}", cell(&b["node"])),
            format!("{}, {lag}", cell(&b["state"])),
        ]);
    }
    table(&[], &rows)
}

fn health(v: &Value) -> String {
    let raft = &v["raft"];
    let ring: Vec<String> =
        v["ring"].as_array().map(|a| a.iter().map(cell).collect()).unwrap_or_default();
    format!(
        "answered by node {}\nraft: leader {}, term {}, commit index {}\nplacement epoch {}, replicas {}, ring [{}], down {}, under-replicated tenants {}\n{}\n{}",
        cell(&v["node"]),
        cell(&raft["leader"]),
        cell(&raft["term"]),
        cell(&raft["commit_index"]),
        cell(&v["placement_epoch"]),
        cell(&v["replicas"]),
        ring.join(", "),
        cell(&v["down"]),
        cell(&v["under_replicated"]),
        rebuild_lines(&v["rebuilds"]),
        node_table(&v["nodes"])
    )
}

/// One line per node rebuilding the copies it lost with its tenant store, or done since it
/// started.
fn rebuild_lines(v: &Value) -> String {
    let mut out = String::new();
    for r in v.as_array().into_iter().flatten() {
        let number = |k: &str| r[k].as_u64().unwrap_or(0);
        let mb = number("bytes_taken") as f64 / 1e6;
        let s = number("elapsed_ms") as f64 / 1e3;
        out.push_str(&if r["done"].as_bool() == Some(true) {
            format!(
                "node {} rebuilt its {} copies in {s:.1} s ({mb:.1} MB of snapshots)\n",
                cell(&r["node"]),
                number("copies_total")
            )
        } else {
            format!(
                "node {} rebuilding: {} of {} copies left after {s:.1} s ({mb:.1} MB of snapshots so far)\n",
                cell(&r["node"]),
                number("copies_left"),
                number("copies_total")
            )
        });
    }
    out
}

pub(super) fn node_table(v: &Value) -> String {
    let columns = ["id", "addr", "state", "health", "raft", "tenants"];
    table(&["ID", "ADDR", "STATE", "HEALTH", "RAFT", "TENANTS"], &rows_of(v, &columns))
}

/// One row per object of the array `v`, with the given fields as cells.
pub(super) fn rows_of(v: &Value, columns: &[&str]) -> Vec<Vec<String>> {
    let objects = v.as_array().map(Vec::as_slice).unwrap_or_default();
    objects.iter().map(|o| columns.iter().map(|c| cell(&o[*c])).collect()).collect()
}

/// `key  value` lines for the given fields of an object.
fn pairs(v: &Value, keys: &[&str]) -> String {
    let rows: Vec<Vec<String>> = keys.iter().map(|k| vec![k.to_string(), cell(&v[*k])]).collect();
    table(&[], &rows)
}

/// A JSON value as a table cell: strings bare, null as `-`.
pub(super) fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Left-aligned columns two spaces apart; `headers` may be empty.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut lines: Vec<Vec<String>> = Vec::with_capacity(rows.len() + 1);
    if !headers.is_empty() {
        lines.push(headers.iter().map(|h| h.to_string()).collect());
    }
    lines.extend(rows.iter().cloned());
    let columns = lines.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            lines.iter().filter_map(|l| l.get(i)).map(|c| c.chars().count()).max().unwrap_or(0)
        })
        .collect();
    aligned(&lines, &widths)
}

/// `lines` in columns of `widths`, two spaces apart.
pub(super) fn aligned(lines: &[Vec<String>], widths: &[usize]) -> String {
    let mut out = String::new();
    for line in lines {
        let cells: Vec<String> = line.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    // Goal: columns line up whatever the cell widths, and null shows as "-".
    #[test]
    fn tables_align() {
        let v = json!([{"id": 1, "addr": "127.0.0.1:7100", "state": "active", "health": "alive", "raft": "voter", "tenants": 12},
                       {"id": 22, "addr": "h:1", "state": "draining", "health": null, "raft": "learner", "tenants": 0}]);
        let text = node_table(&v);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "ID  ADDR            STATE     HEALTH  RAFT     TENANTS");
        assert_eq!(lines[1], "1   127.0.0.1:7100  active    alive   voter    12");
        assert_eq!(lines[2], "22  h:1             draining  -       learner  0");
    }

    // Goal: a node still rebuilding shows what is left, one done what it took; none, no line.
    #[test]
    fn rebuilds_show_progress_then_the_total() {
        let v = json!([
            {"node": 2, "copies_total": 40, "copies_left": 12, "bytes_taken": 5_500_000, "elapsed_ms": 4200, "done": false},
            {"node": 3, "copies_total": 40, "copies_left": 0, "bytes_taken": 1_000_000_000, "elapsed_ms": 12_570, "done": true},
        ]);
        assert_eq!(
            rebuild_lines(&v),
            "node 2 rebuilding: 12 of 40 copies left after 4.2 s (5.5 MB of snapshots so far)\n\
             node 3 rebuilt its 40 copies in 12.6 s (1000.0 MB of snapshots)\n"
        );
        assert_eq!(rebuild_lines(&json!([])), "");
        assert_eq!(rebuild_lines(&Value::Null), "");
    }
}
