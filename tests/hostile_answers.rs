//! Black-box, as a hostile client: requests whose answers would be far larger than what they
//! send. Each must be sized and refused before anything is built, with a final error that tells
//! the client what to do and nothing of the cluster's insides, while the node keeps serving.

mod common;
mod ops_common;

use common::{http, DevCluster};
use ops_common::node_pid;

/// Lines of the amplifying manifest: each names a scroll a million breaks from the origin, so the
/// answer would be about 200 MB.
const MANIFEST_LINES: u32 = 200;

/// How much the owner's peak resident memory may grow while refusing it, in KiB: well under the
/// 200 MB the answer would have cost to build.
const PEAK_GROWTH_KIB_MAX: u64 = 16 * 1024;

/// A line of a process's `/proc/<pid>/status` in KiB: `VmRSS` (resident now) or `VmHWM` (peak).
fn status_kib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Resets a process's peak resident set to what it holds now, so a later `VmHWM` is the peak of
/// what came after.
fn reset_peak(pid: i32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

// Goal: the 200-line `delta` manifest of scrolls far from the origin, against an absent document,
// is refused with 422 and no Retry-After (asking again cannot help), its body names the answer's
// size and the limit and no internals, the owner's peak memory barely moves, and the tenant is
// served normally right after; a modest delta of the same document still answers in full.
#[test]
fn amplifying_delta_is_refused_before_it_is_built() {
    let cluster = DevCluster::start(1);
    let base = cluster.url();
    let key = cluster.add_tenant("hostile", serde_json::json!({}));
    let pid = node_pid(&cluster, 1);
    let manifest: String =
        (1..=MANIFEST_LINES).map(|k| format!("1.1.{k}/1.1.1/1.1.1000000: 00\n")).collect();

    reset_peak(pid);
    let before = status_kib(pid, "VmRSS:");
    let r = http()
        .post(format!("{base}/delta?p=absent"))
        .bearer_auth(&key)
        .body(manifest)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let retry_after = r.headers().get("retry-after").cloned();
    let body = r.text().unwrap();
    let growth = status_kib(pid, "VmHWM:").saturating_sub(before);

    assert_eq!(status, 422, "{body}");
    assert_eq!(retry_after, None, "a final refusal suggests no retry");
    assert!(body.contains("ask for less") && body.contains("16777216"), "{body}");
    for internal in ["frame", "node", "127.0.0.1"] {
        assert!(!body.contains(internal), "the body leaks {internal:?}: {body}");
    }
    assert!(growth < PEAK_GROWTH_KIB_MAX, "peak RSS grew by {growth} KiB");

    let (status, answer) = common::get(&base, &key, "/update?p=absent&c=1.1.1/1.1.1/1.1.1&s=here");
    assert_eq!((status, answer.as_str()), (200, "Updated 4 bytes"));
    let r = http()
        .post(format!("{base}/delta?p=absent"))
        .bearer_auth(&key)
        .body("1.1.1/1.1.1/1.1.3: 00\n")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.text().unwrap(), "here\u{17}\u{17}---sq:Scroll-Missing---");
}

/// Scrolls of the streamed document and the bytes of each: together just over the answer size a
/// node builds whole (16 MiB), so `get` streams it in 1 MiB frames. Each write stays small enough
/// for a debug build to log it well within the gateway's forward timeout.
const SCROLLS: u8 = 17;
const SCROLL_BYTES: usize = 1 << 20;

fn post(base: &str, key: &str, path: &str, body: Vec<u8>) -> reqwest::blocking::Response {
    http().post(format!("{base}{path}")).bearer_auth(key).body(body).send().unwrap()
}

// Goal: a document larger than a node builds whole is streamed through gateway, QUIC and node:
// `get` answers 200 with the right Content-Length and exactly the document's bytes (their
// checksum equals the `checksum` route's), also after a write changed it since the last read;
// `toc`, `json-export` and `query` of the whole document answer 200 with their Content-Length,
// Content-Type and exactly the answer built whole from the same document; a `delta` that would
// answer the whole document is refused with 422 instead of being built.
#[test]
fn large_document_streams_end_to_end() {
    let cluster = DevCluster::start(1);
    let base = cluster.url();
    let key = cluster.add_tenant("streamer", serde_json::json!({"tier": "team"}));
    let mut expected = Vec::new();
    for k in 1..=SCROLLS {
        let text = vec![b'a' + k; SCROLL_BYTES];
        let r = post(&base, &key, &format!("/update?p=big&c=1.1.1/1.1.1/1.1.{k}"), text.clone());
        assert_eq!(r.status().as_u16(), 200, "{}", r.text().unwrap());
        if k > 1 {
            expected.push(0x17);
        }
        expected.extend_from_slice(&text);
    }
    assert!(expected.len() as u64 > 16 << 20);
    for round in 0..2 {
        let r = http().get(format!("{base}/get?p=big")).bearer_auth(&key).send().unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let length = r.headers()["content-length"].to_str().unwrap().to_string();
        assert_eq!(length, expected.len().to_string(), "round {round}");
        let body = r.bytes().unwrap();
        assert!(body[..] == expected[..], "round {round}: the body differs from the document");
        let (status, checksum) = common::get(&base, &key, "/checksum?p=big");
        assert_eq!((status, checksum), (200, proto::doc::checksum(&body)), "round {round}");
        if round == 0 {
            // Changed since the last read: the next `get` must see it.
            let r = post(&base, &key, "/update?p=big&c=1.1.1/1.1.1/1.1.21", b"ninth".to_vec());
            assert_eq!(r.status().as_u16(), 200);
            expected.extend_from_slice(b"\x17\x17\x17\x17ninth");
        }
    }
    // The other reads of the whole document stream too, each exactly as built from it.
    let doc = proto::Doc::parse(&expected).unwrap();
    let all = "from=1.1.1/1.1.1/1.1.1&to=1.1.1/1.1.1/1.1.99";
    let reads = [
        ("toc?p=big".to_string(), proto::ops::toc(&doc).into_bytes(), "text/plain"),
        (
            "json-export?p=big".into(),
            proto::ops::json_export(&doc).into_bytes(),
            "application/json",
        ),
        (format!("query?p=big&{all}"), query(&doc, all), "application/json"),
    ];
    for (read, built, content_type) in reads {
        assert!(built.len() as u64 > 16 << 20, "{read} is large enough to stream");
        let r = http().get(format!("{base}/{read}")).bearer_auth(&key).send().unwrap();
        assert_eq!(r.status().as_u16(), 200, "{read}");
        let length = r.headers()["content-length"].to_str().unwrap().to_string();
        assert_eq!(length, built.len().to_string(), "{read}");
        let declared = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(declared.starts_with(content_type), "{read}: {declared}");
        let body = r.bytes().unwrap();
        assert!(body[..] == built[..], "{read}: the body differs from the answer built whole");
    }
    let r = post(&base, &key, "/delta?p=big", Vec::new());
    assert_eq!(r.status().as_u16(), 422, "a whole-document delta is refused, not built");
}

/// `query`'s answer built whole, for a query string of the test's own.
fn query(doc: &proto::Doc, params: &str) -> Vec<u8> {
    let request = proto::request::parse(
        proto::request::Method::Get,
        "query",
        &format!("p=big&{params}"),
        b"",
    )
    .unwrap();
    match request {
        proto::SqRequest::Query { selector, limit, .. } => proto::ops::query(doc, &selector, limit),
        other => panic!("not a query: {other:?}"),
    }
}

// Goal: a write of the largest body the API takes (16 MiB) is answered 200 and stored whole,
// however long a debug build's node takes to check, log and apply it: the gateway bounds each
// step of the forward (the request taken a MiB at a time, the answer given time per MiB it
// carries), not the whole, so a large write is never cut for its size with a 503 it would be
// retried after although it was stored.
#[test]
fn largest_write_is_not_cut_for_its_size() {
    let cluster = DevCluster::start(1);
    let base = cluster.url();
    let key = cluster.add_tenant("writer", serde_json::json!({"tier": "team"}));
    let text = vec![b'w'; proto::request::BODY_BYTES_MAX];
    let started = std::time::Instant::now();
    // A client that waits as long as the write takes (a busy debug build: tens of seconds).
    let client = reqwest::blocking::Client::builder()
        .timeout(std::time::Duration::from_secs(120))
        .build()
        .unwrap();
    let r = client
        .post(format!("{base}/update?p=large&c=1.1.1/1.1.1/1.1.1"))
        .bearer_auth(&key)
        .body(text.clone())
        .send()
        .unwrap();
    let status = r.status().as_u16();
    eprintln!("a {} MiB write answered {status} after {:?}", text.len() >> 20, started.elapsed());
    assert_eq!((status, r.text().unwrap()), (200, format!("Updated {} bytes", text.len())));
    let (status, checksum) = common::get(&base, &key, "/checksum?p=large");
    assert_eq!((status, checksum), (200, proto::doc::checksum(&text)));
}
