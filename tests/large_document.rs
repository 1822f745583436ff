//! Black-box: a document of many MiB in a team tenant, read through gateway, QUIC and node at
//! the moments the node has the most to do before it can answer: right after the writes (it
//! writes the document's file out first) and after a restart (it loads the document from disk
//! first). That work grows with the document, so on a busy machine it takes longer than the
//! gateway waits for one frame; the node reports progress meanwhile, and the gateway must
//! never answer 503 for a node that is working.

mod common;

use std::time::{Duration, Instant};

use common::DevCluster;

/// Bytes of each scroll, one write each: the largest body the API takes (16 MiB).
const SCROLL_BYTES: usize = proto::request::BODY_BYTES_MAX;

/// Scrolls of the document: 5 of 16 MiB, 80 MiB in all, past the 64 MiB that one message
/// between processes may carry, so it can only be answered as a stream.
const SCROLLS: u8 = 5;

/// How long the test's client waits for any one answer: the writes and reads of a debug build
/// on a machine shared by several builds take tens of seconds each at worst.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(300);

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(CLIENT_TIMEOUT).build().unwrap()
}

// Goal: `get` of an 80 MiB document answers 200 at the first try, with its Content-Length,
// exactly the bytes written, and a checksum equal to the `checksum` route's answer, both right
// after the writes and after a restart, with no 503 to retry at any point.
#[test]
fn a_large_document_is_read_at_the_first_try() {
    let tmp = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", common::free_tcp_port());
    let mut cluster = DevCluster::start_in(tmp.path(), 1, &listen);
    let base = cluster.url();
    let key = cluster.add_tenant("large", serde_json::json!({"tier": "team"}));
    let mut expected = Vec::new();
    for k in 1..=SCROLLS {
        let text = vec![b'a' + k; SCROLL_BYTES];
        let r = client()
            .post(format!("{base}/update?p=big&c=1.1.1/1.1.1/1.1.{k}"))
            .bearer_auth(&key)
            .body(text.clone())
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 200, "{}", r.text().unwrap());
        if k > 1 {
            expected.push(0x17);
        }
        expected.extend_from_slice(&text);
    }
    let checksum = proto::doc::checksum(&expected);
    read_whole(&base, &key, &expected, &checksum, "right after the writes");
    cluster.stop();
    drop(cluster);
    let _cluster = DevCluster::start_in(tmp.path(), 1, &listen);
    read_whole(&base, &key, &expected, &checksum, "first read after a restart");
}

/// One `get` and one `checksum` of the document, each answered 200 at the first try.
fn read_whole(base: &str, key: &str, expected: &[u8], checksum: &str, when: &str) {
    let started = Instant::now();
    let r = client().get(format!("{base}/get?p=big")).bearer_auth(key).send().unwrap();
    let status = r.status().as_u16();
    let length = r.headers().get("content-length").cloned();
    let body = r.bytes().unwrap();
    eprintln!("{when}: get answered {status} with {} bytes in {:?}", body.len(), started.elapsed());
    assert_eq!(status, 200, "{when}: {}", String::from_utf8_lossy(&body[..body.len().min(300)]));
    assert_eq!(length.unwrap().to_str().unwrap(), expected.len().to_string(), "{when}");
    assert!(body[..] == expected[..], "{when}: the body differs from the document written");
    assert_eq!(proto::doc::checksum(&body), checksum, "{when}");
    let r = client().get(format!("{base}/checksum?p=big")).bearer_auth(key).send().unwrap();
    assert_eq!((r.status().as_u16(), r.text().unwrap().as_str()), (200, checksum), "{when}");
}
