//! Large reads: answers made from a document's file a piece at a time.

use super::super::Opened;
use super::*;

/// Opens `path` (a `get`, `toc`, `query` or `json-export`) streaming above `stream_above` bytes.
fn open_read(store: &Store, path: &str, stream_above: u64) -> Opened {
    let (route, query) = path.split_once('?').unwrap_or((path, ""));
    let request = parse(Method::Get, route, query, b"").expect("test requests parse");
    store.open_read("acme", &request, stream_above).expect("the read opens")
}

/// The whole answer of a streamed read, taken in pieces of `piece` bytes, and its announced
/// length.
fn drain(opened: Opened, piece: usize) -> (u64, Vec<u8>) {
    let Opened::Stream { len, mut file, .. } = opened else {
        panic!("the answer was not streamed")
    };
    let mut answer = Vec::new();
    while let Some(out) = file.next_piece(piece).expect("the file reads") {
        assert!(!out.is_empty());
        assert!(out.len() <= piece + 256, "a piece of {} bytes for {piece}", out.len());
        answer.extend_from_slice(&out);
    }
    (len, answer)
}

// Goal: a streamed `get`, `toc`, `query` and `json-export` answer exactly what the same read
// answers built whole, with the length they announced, for a document with changes not yet
// checkpointed; the answer is the document when it was opened, whatever is written while it is
// read; and an answer under the threshold comes whole.
#[test]
fn streamed_reads_answer_as_built_reads() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = open(dir.path());
    for k in 1..=40 {
        let text = format!("scroll {k} \"quoted\"\nsecond line\t{}", "é".repeat(k));
        post(&store, "acme", &format!("update?p=doc&c=1.1.1/1.1.{}/1.1.{k}", k % 3 + 1), &text);
    }
    let reads = [
        "get?p=doc",
        "toc?p=doc",
        "json-export?p=doc",
        "query?p=doc&from=1.1.1/1.1.1/1.1.1&to=1.1.1/1.1.2/1.1.30",
        "query?p=doc&from=1.1.1/1.1.1/1.1.1&to=9.1.1/1.1.1/1.1.1&limit=7",
        "query?p=doc&set=1.1.1/1.1.1/1.1.3;1.1.1/1.1.1/1.1.4;5.1.1/1.1.1/1.1.1",
    ];
    for read in reads {
        let whole = get(&store, "acme", read);
        let opened = open_read(&store, read, 64);
        assert!(matches!(opened, Opened::Stream { .. }), "{read}");
        // A write after the read opened does not show in its answer.
        post(&store, "acme", "update?p=doc&c=1.1.1/1.1.1/1.1.1", "changed meanwhile");
        let (len, answer) = drain(opened, 50);
        assert_eq!(len, answer.len() as u64, "{read}");
        assert_eq!(String::from_utf8(answer).unwrap(), whole, "{read}");
        get(&store, "acme", "delete?p=doc&c=1.1.1/1.1.1/1.1.1");
        assert_eq!(get(&store, "acme", read), whole, "{read}: the document is as before");
    }
    let Opened::Whole(small) = open_read(&store, "toc?p=doc", 1 << 20) else {
        panic!("an answer under the threshold is built whole")
    };
    assert_eq!(String::from_utf8(small.body).unwrap(), get(&store, "acme", "toc?p=doc"));
    let Opened::Whole(absent) = open_read(&store, "get?p=absent", 0) else {
        panic!("an absent document is answered whole")
    };
    assert!(absent.body.is_empty());
}
