//! The OpenAPI document against a real cluster: schemathesis (from PyPI; `.ci/run` installs it)
//! fuzzes every documented operation through gateway → QUIC → node and must find no 5xx answer
//! and no answer outside the document.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{http, tool_present, DevCluster};

/// Test cases schemathesis generates per operation and phase: enough to reach every status
/// the document lists, few enough to stay within a minute or two on two cores.
const EXAMPLES_PER_OPERATION: &str = "25";

/// The slowest answer accepted, in seconds: a bound, far above what a healthy cluster needs.
const RESPONSE_TIME_S_MAX: &str = "5";

/// The longest one schemathesis run may take before the test fails rather than hangs.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

/// Which checks run and what they accept, each with its reason.
const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/schemathesis.toml");

/// The schemathesis command (program and leading arguments), if installed: its `st` script, or
/// the module through python3 where the script is not on PATH.
fn schemathesis() -> Option<(&'static str, &'static [&'static str])> {
    let candidates: [(&str, &[&str]); 3] =
        [("st", &[]), ("schemathesis", &[]), ("python3", &["-m", "schemathesis.cli"])];
    candidates.into_iter().find(|(bin, pre)| {
        Command::new(bin)
            .args(*pre)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// Runs schemathesis with `args` in `dir`, killing it after [`RUN_TIMEOUT`].
fn run_bounded((bin, pre): (&str, &[&str]), dir: &Path, args: &[&str]) -> Output {
    let child = Command::new(bin)
        .args(pre)
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start schemathesis");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(RUN_TIMEOUT) {
        Ok(output) => output.expect("schemathesis ran"),
        Err(_) => {
            // Our own child, still unreaped (the waiting thread holds it), so the pid is its.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            panic!("schemathesis did not finish within {RUN_TIMEOUT:?}");
        }
    }
}

fn check_run(what: &str, output: &Output) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "schemathesis ({what}) found problems:\n{text}");
    println!(
        "schemathesis ({what}): {}",
        text.lines().rev().find(|l| l.contains("passed") || l.contains("generated")).unwrap_or("")
    );
}

// Goal: the served document is the repo's, and schemathesis finds no 5xx and no schema violation
// on the public API with a tenant key (admin routes answer it 403), nor on the admin API's reads
// with the admin key. Writes with the admin key are not fuzzed: joining or removing random nodes
// would change the cluster under test, not check the document.
#[test]
fn schemathesis_finds_nothing() {
    let found = schemathesis();
    let install = "python3 -m pip install schemathesis, as .ci/run does";
    if !tool_present("schemathesis", found.is_some(), install) {
        return;
    }
    let Some(bin) = found else { return };
    let cluster = DevCluster::start(3);
    let spec_url = format!("{}/openapi.json", cluster.url());
    let served = http().get(&spec_url).send().expect("GET openapi.json");
    assert_eq!(served.status().as_u16(), 200, "openapi.json needs no key");
    assert_eq!(
        served.text().expect("body"),
        gateway::routes::OPENAPI_JSON,
        "the gateway serves the repo's document"
    );

    let work = tempfile::tempdir().expect("temp dir");
    let origin = cluster.json["gateway_url"].as_str().expect("gateway_url").to_string();
    let tenant = format!("Authorization: Bearer {}", cluster.demo_key());
    let admin = format!("Authorization: Bearer {}", cluster.admin_key());
    let common = [
        "--url",
        &origin,
        "-n",
        EXAMPLES_PER_OPERATION,
        "--seed",
        "8",
        "--max-response-time",
        RESPONSE_TIME_S_MAX,
        "--workers",
        "1",
    ];

    let mut args = vec!["--config-file", CONFIG, "run", &spec_url, "-H", &tenant];
    args.extend(common);
    check_run("tenant key", &run_bounded(bin, work.path(), &args));

    // Include filters of different kinds widen the selection; exclusions narrow it.
    let mut args = vec![
        "--config-file",
        CONFIG,
        "run",
        &spec_url,
        "-H",
        &admin,
        "--include-path-regex",
        "^/api/v2/(admin|metrics)",
    ];
    args.extend([
        "--exclude-method",
        "POST",
        "--exclude-method",
        "PATCH",
        "--exclude-method",
        "DELETE",
    ]);
    args.extend(common);
    check_run("admin key, reads", &run_bounded(bin, work.path(), &args));
}
