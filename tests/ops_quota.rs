//! Black-box: storage quotas on a real cluster, written through two gateway processes at once.

mod common;
mod ops_common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{get, http, DevCluster};
use ops_common::{node_log_lines, stats, SecondGateway};

/// The text of every write: 8 KiB, so a 1 MiB quota fills in about 128 writes.
const SCROLL_BYTES: usize = 8 * 1024;

/// The quota under test.
const QUOTA_BYTES: u64 = 1024 * 1024;

/// Writers per gateway.
const WRITERS_PER_GATEWAY: usize = 2;

/// The most writes one writer tries before the test gives up on ever seeing 507.
const WRITES_PER_WRITER_MAX: usize = 1000;

/// How many times one write is sent while it is answered 503 with Retry-After.
const RETRIES_AFTER_503: usize = 50;

#[derive(Default)]
struct Outcome {
    /// (coordinate, text) of every acknowledged write.
    acked: Vec<(String, String)>,
    /// Statuses other than 200 and 507.
    unexpected: Vec<(u16, String)>,
    refused: usize,
}

// Goal: a tenant with a 1 MB quota, written by four writers through two gateways at once, gets
// 507 once the quota is full and never passes it by more than one request's size (here: never
// passes it at all); a refused write changes nothing; every acknowledged write reads back
// intact; stats show used ≤ quota; the owner logged the 90% warning.
#[test]
fn quota_507_across_two_gateways() {
    let cluster = DevCluster::start(3);
    let key = cluster.add_tenant("quota", serde_json::json!({"quota_mb": 1}));
    let second = SecondGateway::start(&cluster, &key);
    let outcome = Arc::new(Mutex::new(Outcome::default()));
    let mut writers = Vec::new();
    for (g, base) in [cluster.url(), second.url.clone()].into_iter().enumerate() {
        for w in 0..WRITERS_PER_GATEWAY {
            let (base, key, outcome) = (base.clone(), key.clone(), outcome.clone());
            let book = g * WRITERS_PER_GATEWAY + w + 1;
            writers.push(std::thread::spawn(move || write_until_full(&base, &key, book, &outcome)));
        }
    }
    for w in writers {
        w.join().unwrap();
    }
    let outcome = outcome.lock().unwrap();
    assert!(outcome.unexpected.is_empty(), "unexpected answers: {:?}", outcome.unexpected);
    assert_eq!(outcome.refused, 2 * WRITERS_PER_GATEWAY, "every writer ends on a 507");
    let acked_bytes = (outcome.acked.len() * SCROLL_BYTES) as u64;
    eprintln!(
        "{} writes acknowledged ({acked_bytes} bytes of text) before 507",
        outcome.acked.len()
    );

    let s = stats(&cluster, "quota");
    let used = s["storage_used_bytes"].as_u64().unwrap();
    eprintln!("stats after the 507s: {s}");
    assert!(used <= QUOTA_BYTES, "used {used} bytes passes the quota of {QUOTA_BYTES}");
    assert!(
        used + 2 * SCROLL_BYTES as u64 > QUOTA_BYTES,
        "507 came with {used} of {QUOTA_BYTES} bytes used"
    );
    assert!(
        used >= acked_bytes,
        "stats count {used} bytes but {acked_bytes} bytes of text were acknowledged"
    );
    assert!(s["storage_used_mb"].as_f64().unwrap() <= s["quota_mb"].as_f64().unwrap());
    assert_eq!(s["quota_mb"], 1);

    // A refused write changes nothing: same checksum, same usage.
    let base = cluster.url();
    let before = get(&base, &key, "/checksum?p=doc");
    let big = "x".repeat(4 * SCROLL_BYTES);
    let r = http()
        .post(format!("{base}/update?p=doc&c=2.1.1/1.1.1/1.1.1"))
        .bearer_auth(&key)
        .body(big)
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 507);
    assert_eq!(get(&base, &key, "/checksum?p=doc"), before);
    assert_eq!(stats(&cluster, "quota")["storage_used_bytes"].as_u64().unwrap(), used);

    // Every acknowledged write is there, whichever gateway took it.
    for (c, text) in &outcome.acked {
        let (status, body) = get(&second.url, &key, &format!("/select?p=doc&c={c}"));
        assert_eq!(status, 200, "{c}");
        assert!(
            body == *text,
            "{c}: the acknowledged text came back changed ({} bytes)",
            body.len()
        );
    }
    assert!(
        node_log_lines(&cluster.dir, "tenant at or over 90% of its quota") > 0,
        "no 90% warning was logged"
    );
}

/// Writes 8 KiB scrolls to book `book` until the gateway answers 507.
fn write_until_full(base: &str, key: &str, book: usize, outcome: &Mutex<Outcome>) {
    let client = http();
    for i in 1..=WRITES_PER_WRITER_MAX {
        let c = format!("1.1.1/1.1.{book}/1.1.{i}");
        let text: String = format!("b{book}s{i}-").chars().cycle().take(SCROLL_BYTES).collect();
        // A 503 with Retry-After asks the client to send the write again (with three copies, a
        // primary whose lease lapsed under a loaded machine's pauses says so); the same write at
        // the same coordinate is sent again, a bounded number of times.
        let mut answer = (0, String::new());
        for _ in 0..RETRIES_AFTER_503 {
            let r = client
                .post(format!("{base}/update?p=doc&c={c}"))
                .bearer_auth(key)
                .body(text.clone())
                .send();
            let again = r.as_ref().is_ok_and(|r| {
                r.status().as_u16() == 503 && r.headers().contains_key("retry-after")
            });
            answer = match r {
                Ok(r) => (r.status().as_u16(), r.text().unwrap_or_default()),
                Err(e) => (0, e.to_string()),
            };
            if !again {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let (status, body) = answer;
        let mut o = outcome.lock().unwrap();
        match status {
            200 => o.acked.push((c, text)),
            507 => {
                o.refused += 1;
                return;
            }
            _ => {
                o.unexpected.push((status, body));
                return;
            }
        }
    }
    panic!("book {book}: no 507 after {WRITES_PER_WRITER_MAX} writes of {SCROLL_BYTES} bytes");
}
