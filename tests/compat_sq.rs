//! Existing SQ clients work unchanged: every request of the recorded client flows
//! (`tests/fixtures/sq06/cases_*.json`: phext-notepad, community scripts, cases written from SQ
//! 0.6.0's source, raw request targets) is sent byte for byte over a raw socket to `sq-cloud
//! dev`, and its status and body must equal what SQ 0.6.0 answered (recorded once in
//! `answers_*.json`), unless the difference is one of [`DELIBERATE`], each of which the README's
//! "Compatibility with SQ 0.6.0" table lists with its reason.
//!
//! Re-recording SQ's answers needs SQ 0.6.0 itself: `tests/fixtures/sq06/record.sh` builds it
//! and runs `record.py`, which sends the same bytes (built as `raw.rs` builds them) to a fresh
//! `sq host` and rewrites the answer files. CI never builds SQ and needs no python: it only
//! reads the recorded answers.

mod common;
#[path = "compat_sq/raw.rs"]
mod raw;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::DevCluster;
use raw::{send, Answer, Case};
use serde::Deserialize;

/// The case files, in the order they are replayed (state carries from one to the next).
const CASE_FILES: [&str; 4] = ["notepad", "community", "source", "raw_target"];

#[path = "compat_sq/deliberate.rs"]
mod deliberate;
use deliberate::DELIBERATE;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sq06")
}

#[derive(Deserialize)]
struct CaseFile {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct AnswerFile {
    answers: BTreeMap<String, Answer>,
}

fn cases(name: &str) -> Vec<Case> {
    let path = fixtures().join(format!("cases_{name}.json"));
    let file: CaseFile =
        serde_json::from_slice(&std::fs::read(&path).expect("case file")).expect("case JSON");
    let mut seen = std::collections::HashSet::new();
    for c in &file.cases {
        assert!(seen.insert(&c.name), "case name {:?} is used twice in {name}", c.name);
    }
    file.cases
}

fn answers(name: &str) -> BTreeMap<String, Answer> {
    let path = fixtures().join(format!("answers_{name}.json"));
    let file: AnswerFile =
        serde_json::from_slice(&std::fs::read(&path).expect("answer file")).expect("answer JSON");
    file.answers
}

fn show(answer: &Answer) -> String {
    let body = String::from_utf8_lossy(&answer.body_bytes()).into_owned();
    let body: String = body.chars().take(200).collect();
    format!("{:?} {:?}", answer.status, body)
}

// Goal: every recorded client request answers as SQ 0.6.0 did, in status and body, except the
// deliberate differences, which must answer exactly as the table says (and must still differ).
#[test]
fn clients_answer_as_sq_0_6_0() {
    let cluster = DevCluster::start(1);
    let port: u16 = cluster.listen.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
    let key = cluster.demo_key();
    let mut failures = Vec::new();
    let (mut total, mut same, mut deliberate) = (0, 0, 0);
    let mut used = std::collections::HashSet::new();
    for name in CASE_FILES {
        let recorded = answers(name);
        for case in cases(name) {
            total += 1;
            let Some(sq) = recorded.get(&case.name) else {
                failures.push(format!("[{name}] {}: no recorded answer; re-record", case.name));
                continue;
            };
            let ours = send(port, &key, &case);
            let matches = ours.status == sq.status && ours.body_bytes() == sq.body_bytes();
            let listed = DELIBERATE.iter().find(|d| d.case == case.name);
            match (matches, listed) {
                (true, None) => same += 1,
                (true, Some(_)) => failures.push(format!(
                    "[{name}] {}: listed as a deliberate difference but answers as SQ does",
                    case.name
                )),
                (false, Some(d)) => {
                    used.insert(d.case);
                    if d.expect.holds(&ours) {
                        deliberate += 1;
                    } else {
                        failures.push(format!(
                            "[{name}] {}: deliberate difference, but the answer {} is not {:?}",
                            case.name,
                            show(&ours),
                            d.expect
                        ));
                    }
                }
                (false, None) => failures.push(format!(
                    "[{name}] {}\n    SQ 0.6.0: {}\n    sq-cloud: {}",
                    case.name,
                    show(sq),
                    show(&ours)
                )),
            }
        }
    }
    for d in DELIBERATE {
        if !used.contains(d.case) && !failures.iter().any(|f| f.contains(d.case)) {
            failures.push(format!("deliberate difference {:?} names no case", d.case));
        }
    }
    println!("{total} requests: {same} answer as SQ 0.6.0, {deliberate} differ deliberately");
    assert!(failures.is_empty(), "{} of {total} differ:\n{}", failures.len(), failures.join("\n"));
}

// Goal: the README's compatibility table lists every deliberate difference, so the list a
// reader sees is the list the test holds the service to.
#[test]
fn readme_lists_every_deliberate_difference() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let section = readme
        .split("## Compatibility with SQ 0.6.0")
        .nth(1)
        .expect("README has a \"Compatibility with SQ 0.6.0\" section");
    let section = section.split("\n## ").next().unwrap_or(section);
    for d in DELIBERATE {
        assert!(
            section.contains(d.case),
            "README's compatibility table does not list {:?}",
            d.case
        );
    }
}
