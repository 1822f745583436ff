use serde::{Deserialize, Serialize};

use super::*;
use crate::frame::{parse_header, raw_header, HEADER_BYTES, MAGIC};
use crate::{FRAME_BYTES_MAX, PROTOCOL_VERSION};

/// What parsing a header should give: the payload length, or the error variant's name.
fn check(header: [u8; HEADER_BYTES], expected: std::result::Result<usize, &str>) {
    let got = parse_header(&header).map_err(|e| match e {
        TransportError::Malformed { .. } => "Malformed",
        TransportError::VersionMismatch { .. } => "VersionMismatch",
        TransportError::FrameTooLarge { .. } => "FrameTooLarge",
        other => panic!("unexpected error {other:?}"),
    });
    assert_eq!(got, expected, "header {header:?}");
}

#[test]
fn headers_are_checked_for_magic_version_and_length() {
    // Goal: the header parser accepts exactly this version's frames up to the size limit; a
    // progress frame is never taken for a frame that carries a payload (a request, an answer).
    let max = FRAME_BYTES_MAX as u32;
    check(raw_header(PROTOCOL_VERSION, 0), Ok(0));
    check(raw_header(PROTOCOL_VERSION, 5), Ok(5));
    check(raw_header(PROTOCOL_VERSION, max), Ok(FRAME_BYTES_MAX));
    check(raw_header(PROTOCOL_VERSION, max + 1), Err("FrameTooLarge"));
    check(raw_header(PROTOCOL_VERSION, u32::MAX), Err("FrameTooLarge"));
    check(raw_header(PROTOCOL_VERSION + 1, 5), Err("VersionMismatch"));
    check(raw_header(0, 5), Err("VersionMismatch"));
    let mut bad_magic = raw_header(PROTOCOL_VERSION, 5);
    bad_magic[0] = b'X';
    check(bad_magic, Err("Malformed"));
    check(crate::frame::PROGRESS, Err("Malformed"));
    assert_eq!(
        &raw_header(PROTOCOL_VERSION, 0x0102_0304)[..],
        &[MAGIC[0], MAGIC[1], MAGIC[2], PROTOCOL_VERSION, 1, 2, 3, 4]
    );
}

#[test]
fn payloads_round_trip_and_trailing_bytes_are_refused() {
    // Goal: encode/decode are inverse, and a payload with extra bytes (a type mismatch
    // between the two ends) is refused rather than silently truncated.
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    enum Msg {
        Put { key: String, value: Vec<u8> },
        Ack(u64),
    }
    let msg = Msg::Put { key: "1.1.1/1.1.1/1.1.1".into(), value: vec![0, 1, 2] };
    let bytes = encode(&msg).expect("encode");
    assert_eq!(decode::<Msg>(&bytes).expect("decode"), msg);

    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(decode::<Msg>(&longer), Err(TransportError::Decode(_))));
    assert!(matches!(decode::<Msg>(&bytes[..bytes.len() - 1]), Err(TransportError::Decode(_))));
    assert!(matches!(decode::<Msg>(&[]), Err(TransportError::Decode(_))));
}

#[tokio::test]
async fn oversized_request_is_refused_before_sending() {
    // Goal: the client refuses a request over FRAME_BYTES_MAX without touching the network.
    bounded(async {
        let cluster = Cluster::new();
        let client = cluster.client();
        let big = Bytes::from(vec![0u8; FRAME_BYTES_MAX + 1]);
        let err = client.call(localhost(), big, CALL_TIMEOUT).await.expect_err("too large");
        assert!(matches!(err, TransportError::FrameTooLarge { .. }), "{err:?}");
        assert_eq!(client.stats().connections_opened, 0);
    })
    .await;
}

#[tokio::test]
async fn server_refuses_a_frame_declared_over_the_limit() {
    // Goal: a peer announcing a frame over FRAME_BYTES_MAX is refused from the header alone,
    // and its client sees FrameTooLarge.
    bounded(async {
        let cluster = Cluster::new();
        let server = cluster.start(Arc::new(Echo));
        let client = cluster.client();
        let header = raw_header(PROTOCOL_VERSION, FRAME_BYTES_MAX as u32 + 1);
        let err = raw_call(&client, server.addr, &header, FRAME_BYTES_MAX + 1)
            .await
            .expect_err("refused");
        assert!(matches!(err, TransportError::FrameTooLarge { .. }), "{err:?}");
        // The refusal costs the stream, not the connection.
        client
            .call(server.addr, Bytes::new(), CALL_TIMEOUT)
            .await
            .expect("connection still usable");
        assert_eq!(client.stats().connections_opened, 1);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn server_refuses_a_frame_of_another_version() {
    // Goal: a request framed with another protocol version is refused with VersionMismatch,
    // and the client learns the server's version.
    bounded(async {
        let cluster = Cluster::new();
        let server = cluster.start(Arc::new(Echo));
        let client = cluster.client();
        let mut bytes = raw_header(PROTOCOL_VERSION + 1, 2).to_vec();
        bytes.extend_from_slice(b"hi");
        let err = raw_call(&client, server.addr, &bytes, 2).await.expect_err("refused");
        assert!(
            matches!(err, TransportError::VersionMismatch { theirs, .. } if theirs == PROTOCOL_VERSION),
            "{err:?}"
        );
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn server_refuses_a_frame_without_magic() {
    // Goal: bytes that are not a frame are refused as Malformed.
    bounded(async {
        let cluster = Cluster::new();
        let server = cluster.start(Arc::new(Echo));
        let err = raw_call(&cluster.client(), server.addr, b"GET / HTTP/1.1\r\n", 16).await;
        assert!(matches!(err, Err(TransportError::Malformed { .. })), "{err:?}");
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn server_refuses_bytes_after_the_frame() {
    // Goal: a stream carries exactly one frame; anything after it is refused as Malformed and
    // the handler never runs.
    bounded(async {
        let cluster = Cluster::new();
        let server = cluster.start(Arc::new(Echo));
        let mut bytes = raw_header(PROTOCOL_VERSION, 2).to_vec();
        bytes.extend_from_slice(b"hi and more");
        let err = raw_call(&cluster.client(), server.addr, &bytes, bytes.len()).await;
        assert!(matches!(err, Err(TransportError::Malformed { .. })), "{err:?}");
        let mut exact = raw_header(PROTOCOL_VERSION, 2).to_vec();
        exact.extend_from_slice(b"hi");
        let echoed = raw_call(&cluster.client(), server.addr, &exact, exact.len()).await;
        assert_eq!(echoed.expect("one whole frame is served"), Bytes::from_static(b"hi"));
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn stalled_request_is_cut_by_the_read_timeout() {
    // Goal: a peer that announces a payload and never sends it holds the stream only until
    // the server's read timeout, and learns it timed out.
    bounded(async {
        let cluster = Cluster::new();
        let limits = ServerLimits {
            request_read_timeout: Duration::from_millis(200),
            ..ServerLimits::default()
        };
        let server =
            start_at(&cluster.identity(Role::Node(1)), localhost(), limits, Arc::new(Echo))
                .expect("start");
        let header = raw_header(PROTOCOL_VERSION, 10);
        let err = raw_call_unfinished(&cluster.client(), server.addr, &header, 10)
            .await
            .expect_err("timed out");
        assert!(matches!(err, TransportError::Timeout { .. }), "{err:?}");
        server.stop().await;
    })
    .await;
}

/// Answers every request with one byte more than a frame may hold.
struct Oversized;

impl Handler for Oversized {
    fn handle(&self, _peer: Peer, _request: Bytes) -> HandlerFuture<'_> {
        Box::pin(async { Bytes::from(vec![0u8; FRAME_BYTES_MAX + 1]) })
    }
}

#[tokio::test]
async fn oversized_response_is_refused_by_the_client() {
    // Goal: a response over FRAME_BYTES_MAX reaches the client as FrameTooLarge with its
    // true length, and is never buffered.
    bounded(async {
        let cluster = Cluster::new();
        let server = cluster.start(Arc::new(Oversized));
        let err = cluster.client().call(server.addr, Bytes::new(), CALL_TIMEOUT).await;
        assert!(
            matches!(err, Err(TransportError::FrameTooLarge { len, .. }) if len == FRAME_BYTES_MAX as u64 + 1),
            "{err:?}"
        );
        server.stop().await;
    })
    .await;
}
