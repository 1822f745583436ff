use std::net::UdpSocket;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Mutex};

use super::*;

#[tokio::test]
async fn echo_round_trip() {
    // Goal: a request reaches the handler and its answer comes back unchanged, raw and typed.
    bounded(async {
        let cluster = Cluster::new();
        let server = cluster.start(Arc::new(Echo));
        let client = cluster.client();

        let reply = client.call(server.addr, Bytes::from_static(b"hello"), CALL_TIMEOUT).await;
        assert_eq!(reply.expect("call"), Bytes::from_static(b"hello"));

        let empty = client.call(server.addr, Bytes::new(), CALL_TIMEOUT).await;
        assert_eq!(empty.expect("empty call"), Bytes::new());

        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        struct Ping {
            seq: u64,
            note: String,
        }
        let ping = Ping { seq: 7, note: "phext".into() };
        let pong: Ping =
            client.call_typed(server.addr, &ping, CALL_TIMEOUT).await.expect("typed call");
        assert_eq!(pong, ping);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn handler_sees_the_role_in_the_client_certificate() {
    // Goal: the server learns the caller's role from its certificate, not from anything it sends.
    bounded(async {
        let cluster = Cluster::new();
        let server = cluster.start(Arc::new(WhoAmI));
        let reply = cluster.client().call(server.addr, Bytes::new(), CALL_TIMEOUT).await;
        assert_eq!(reply.expect("call"), Bytes::from_static(b"gateway"));

        certs::issue(cluster.path(), Role::Node(42)).expect("issue node-42");
        // A client for loopback peers binds loopback only, and reaches its loopback server.
        let peers = [server.addr.ip()];
        let node =
            Client::for_peers(&cluster.identity(Role::Node(42)), ClientLimits::default(), &peers)
                .expect("client");
        assert!(node.local_addr().expect("local addr").ip().is_loopback());
        let reply = node.call(server.addr, Bytes::new(), CALL_TIMEOUT).await;
        assert_eq!(reply.expect("call"), Bytes::from_static(b"node-42"));
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn concurrent_calls_share_one_connection() {
    // Goal: 100 concurrent calls from clones of one client all succeed over a single connection.
    bounded(async {
        let cluster = Cluster::new();
        let server = cluster.start(Arc::new(Echo));
        let client = cluster.client();
        let calls = (0..100u32).map(|i| {
            let client = client.clone();
            async move {
                let request = Bytes::from(i.to_be_bytes().to_vec());
                let reply = client.call(server.addr, request.clone(), CALL_TIMEOUT).await;
                assert_eq!(reply.expect("call"), request);
            }
        });
        futures::future::join_all(calls).await;
        assert_eq!(client.stats().connections_opened, 1);
        assert_eq!(client.stats().pooled_peers, 1);
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn call_to_a_silent_address_fails_within_its_timeout() {
    // Goal: a peer that never answers costs the caller its timeout and no more: the call
    // times out (call timeout shorter) or fails to connect (connect timeout shorter).
    bounded(async {
        let cluster = Cluster::new();
        // A bound socket nobody reads: packets to it vanish, like a dead node's.
        let silent = UdpSocket::bind(localhost()).expect("bind");
        let addr = silent.local_addr().expect("addr");

        let started = Instant::now();
        let err = cluster.client().call(addr, Bytes::new(), Duration::from_millis(300)).await;
        let err = err.expect_err("nothing answers");
        assert!(matches!(err, TransportError::Timeout { .. }), "{err:?}");
        assert!(err.is_unavailable());
        assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());

        let limits =
            ClientLimits { connect_timeout: Duration::from_millis(300), ..ClientLimits::default() };
        let client = Client::new(&cluster.identity(Role::Gateway), limits).expect("client");
        let started = Instant::now();
        let err = client.call(addr, Bytes::new(), CALL_TIMEOUT).await.expect_err("nothing answers");
        assert!(matches!(err, TransportError::Connect { .. }), "{err:?}");
        assert!(err.is_unavailable());
        assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    })
    .await;
}

#[tokio::test]
async fn client_reconnects_after_server_restart() {
    // Goal: when the server restarts on the same port, the pooled connection is replaced
    // by a new one and calls work again.
    bounded(async {
        let cluster = Cluster::new();
        let server = cluster.start(Arc::new(Echo));
        let addr = server.addr;
        let client = cluster.client();
        client.call(addr, Bytes::from_static(b"before"), CALL_TIMEOUT).await.expect("call");
        let (pooled, _) = client.connection(addr).await.expect("pooled connection");

        server.stop().await;
        // The client learns of the close from the server's CONNECTION_CLOSE, not from time.
        pooled.closed().await;
        let restarted = restart_on(&cluster, addr).await;

        let reply = client.call(addr, Bytes::from_static(b"after"), CALL_TIMEOUT).await;
        assert_eq!(reply.expect("call after restart"), Bytes::from_static(b"after"));
        assert_eq!(client.stats().connections_opened, 2);
        restarted.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_crashed_server_started_again_resets_the_old_connection_at_once() {
    // Goal: a node's process that died without a word and started again on its port (same key
    // files) ends a client's pooled connection to the old process with a stateless reset the
    // client recognises: the client's next call fails at once, not at its timeout, and the
    // call after it opens a new connection.
    bounded(async {
        let cluster = Cluster::new();
        let (client, addr, pooled, old) = one_call_then_vanish(&cluster).await;
        let again = restart_as(&cluster, addr, Role::Node(1)).await;

        let err = client
            .call(addr, Bytes::from_static(b"to the old connection"), CALL_TIMEOUT)
            .await
            .expect_err("the old connection is gone");
        assert!(!matches!(err, TransportError::Timeout { .. }), "{err:?}");
        assert!(err.is_unavailable(), "{err:?}");
        assert_eq!(pooled.close_reason(), Some(quinn::ConnectionError::Reset));

        let reply = client.call(addr, Bytes::from_static(b"after"), CALL_TIMEOUT).await;
        assert_eq!(reply.expect("call after the restart"), Bytes::from_static(b"after"));
        assert_eq!(client.stats().connections_opened, 2);
        again.stop().await;
        old.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_server_with_another_key_cannot_reset_the_old_connection() {
    // Goal: the control of the test above. A process with another private key at the same
    // address signs its stateless resets with another key: the client ignores them, and its
    // call on the old connection runs into its timeout, as every call to a restarted node
    // did while the reset key was random per process.
    bounded(async {
        let cluster = Cluster::new();
        certs::issue(cluster.path(), Role::Node(2)).expect("issue node-2");
        let (client, addr, pooled, old) = one_call_then_vanish(&cluster).await;
        let again = restart_as(&cluster, addr, Role::Node(2)).await;

        let short = Duration::from_secs(1);
        let err = client
            .call(addr, Bytes::from_static(b"to the old connection"), short)
            .await
            .expect_err("no answer on the old connection");
        assert!(matches!(err, TransportError::Timeout { .. }), "{err:?}");
        assert_eq!(pooled.close_reason(), None);
        again.stop().await;
        old.stop().await;
    })
    .await;
}

/// A node-1 echo server and a client that called it once; the server has since vanished as a
/// crash would. Returns the client, the server's address, the client's pooled connection and
/// the vanished server (still running on another socket).
async fn one_call_then_vanish(
    cluster: &Cluster,
) -> (Client, SocketAddr, quinn::Connection, Running) {
    let server = cluster.start(Arc::new(Echo));
    let client = cluster.client();
    client.call(server.addr, Bytes::from_static(b"before"), CALL_TIMEOUT).await.expect("call");
    let (pooled, _) = client.connection(server.addr).await.expect("pooled connection");
    server.vanish();
    (client, server.addr, pooled, server)
}

/// Binds a new server on `addr` as node 1. The old endpoint's socket is released by its driver
/// task once every handle is gone, which may be a scheduler turn after `run` returned.
async fn restart_on(cluster: &Cluster, addr: SocketAddr) -> Running {
    restart_as(cluster, addr, Role::Node(1)).await
}

/// Binds a new echo server on `addr` with `role`'s identity, as [`restart_on`].
async fn restart_as(cluster: &Cluster, addr: SocketAddr, role: Role) -> Running {
    loop {
        let identity = cluster.identity(role);
        match start_at(&identity, addr, ServerLimits::default(), Arc::new(Echo)) {
            Ok(running) => return running,
            Err(TransportError::Io(e)) if e.kind() == std::io::ErrorKind::AddrInUse => {
                tokio::task::yield_now().await
            }
            Err(e) => panic!("restart: {e}"),
        }
    }
}

#[tokio::test]
async fn forget_drops_the_pooled_connection() {
    // Goal: after forget, the peer leaves the pool and the next call opens a new connection.
    bounded(async {
        let cluster = Cluster::new();
        let server = cluster.start(Arc::new(Echo));
        let client = cluster.client();
        client.call(server.addr, Bytes::new(), CALL_TIMEOUT).await.expect("call");
        client.forget(server.addr);
        assert_eq!(client.stats().pooled_peers, 0);
        client.call(server.addr, Bytes::new(), CALL_TIMEOUT).await.expect("call after forget");
        assert_eq!(client.stats().connections_opened, 2);
        server.stop().await;
    })
    .await;
}

/// Tells the test when a request arrived, then answers only when the test says so.
struct Gate {
    arrived: mpsc::Sender<()>,
    release: Mutex<Option<oneshot::Receiver<()>>>,
}

impl Handler for Gate {
    fn handle(&self, _peer: Peer, request: Bytes) -> HandlerFuture<'_> {
        Box::pin(async move {
            let _ = self.arrived.send(()).await;
            if let Some(release) = self.release.lock().await.take() {
                let _ = release.await;
            }
            request
        })
    }
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    // Goal: a request being handled when shutdown starts still gets its answer, and run
    // returns once it has.
    bounded(async {
        let cluster = Cluster::new();
        let (arrived_tx, mut arrived) = mpsc::channel(1);
        let (release, release_rx) = oneshot::channel();
        let gate = Gate { arrived: arrived_tx, release: Mutex::new(Some(release_rx)) };
        let server = cluster.start(Arc::new(gate));
        let client = cluster.client();
        let addr = server.addr;
        let call = tokio::spawn(async move {
            client.call(addr, Bytes::from_static(b"slow"), CALL_TIMEOUT).await
        });

        arrived.recv().await.expect("request arrived");
        server.shutdown.cancel();
        release.send(()).expect("handler waiting");
        let reply = call.await.expect("call task");
        assert_eq!(reply.expect("in-flight call"), Bytes::from_static(b"slow"));
        server.task.await.expect("server stopped");
    })
    .await;
}

#[tokio::test]
async fn server_refuses_connections_beyond_its_limit() {
    // Goal: with max_connections = 1, a second peer is refused while the first is served.
    bounded(async {
        let cluster = Cluster::new();
        let limits = ServerLimits { max_connections: 1, ..ServerLimits::default() };
        let server =
            start_at(&cluster.identity(Role::Node(1)), localhost(), limits, Arc::new(Echo))
                .expect("start");
        let first = cluster.client();
        first.call(server.addr, Bytes::new(), CALL_TIMEOUT).await.expect("first peer");

        let err = cluster.client().call(server.addr, Bytes::new(), CALL_TIMEOUT).await;
        let err = err.expect_err("second peer refused");
        assert!(matches!(err, TransportError::Connect { .. }), "{err:?}");
        first.call(server.addr, Bytes::new(), CALL_TIMEOUT).await.expect("first peer still served");
        server.stop().await;
    })
    .await;
}

/// An echo server and a client whose pooled connection to it has carried one call of the
/// 100-byte payload returned with them: what the STOP_SENDING counts start from.
async fn echo_after_one_call() -> (Running, Client, quinn::Connection, Bytes) {
    let cluster = Cluster::new();
    let server = cluster.start(Arc::new(Echo));
    let client = cluster.client();
    let payload = Bytes::from(vec![b'x'; 100]);
    client.call(server.addr, payload.clone(), CALL_TIMEOUT).await.expect("first call");
    let (conn, _) = client.connection(server.addr).await.expect("pooled connection");
    (server, client, conn, payload)
}

#[tokio::test]
async fn streams_close_cleanly_without_stop_sending() {
    // Goal: each side reads its peer's stream to the end, so no call leaves a STOP_SENDING (one
    // more packet per call for both peers) and a call costs about one datagram each way.
    bounded(async {
        let (server, client, conn, payload) = echo_after_one_call().await;
        let before = conn.stats();
        const CALLS: u64 = 200;
        for _ in 0..CALLS {
            client.call(server.addr, payload.clone(), CALL_TIMEOUT).await.expect("call");
        }
        let after = conn.stats();
        assert_eq!(
            after.frame_tx.stop_sending, 0,
            "the client stopped a stream it had not read to the end"
        );
        assert_eq!(
            after.frame_rx.stop_sending, 0,
            "the server stopped a stream it had not read to the end"
        );
        let sent = after.udp_tx.datagrams - before.udp_tx.datagrams;
        assert!(sent < CALLS * 3 / 2, "{sent} datagrams sent for {CALLS} calls");
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_whole_answer_closed_leaves_no_stop_sending() {
    // Goal: a body with no frames, closed with `BodyReader::close`, reads the stream's end that
    // came with the head, so the call leaves no STOP_SENDING (a packet more each way); dropped
    // unread, it does leave one, which is what the count below would catch.
    bounded(async {
        let (server, client, conn, payload) = echo_after_one_call().await;
        for _ in 0..50 {
            let (head, body) =
                client.call_answer(server.addr, payload.clone(), CALL_TIMEOUT).await.expect("call");
            assert_eq!(head, payload);
            body.close();
        }
        // A call on the same connection after the last close: anything the closes queued has
        // been sent by the time its answer is back.
        client.call(server.addr, payload.clone(), CALL_TIMEOUT).await.expect("last call");
        assert_eq!(conn.stats().frame_tx.stop_sending, 0, "a closed body stopped its stream");

        let (_, body) =
            client.call_answer(server.addr, payload.clone(), CALL_TIMEOUT).await.expect("call");
        drop(body);
        client.call(server.addr, payload.clone(), CALL_TIMEOUT).await.expect("last call");
        assert_eq!(conn.stats().frame_tx.stop_sending, 1, "a dropped body stops its stream");
        server.stop().await;
    })
    .await;
}

/// Streams the request back as a body: the head is the piece count, then each piece is the
/// request repeated up to its index, as a frame of its own.
struct StreamBack;

impl Handler for StreamBack {
    fn handle(&self, _peer: Peer, _request: Bytes) -> HandlerFuture<'_> {
        Box::pin(async { Bytes::from_static(b"whole") })
    }

    fn handle_answer(&self, _peer: Peer, request: Bytes) -> crate::AnswerFuture<'_> {
        Box::pin(async move {
            let body = crate::body_unfold(1usize, move |i| {
                let request = request.clone();
                async move { (i <= 3).then(|| (request.repeat(i).into(), i + 1)) }
            });
            crate::Answer { head: Bytes::from_static(b"3"), body: Some(body) }
        })
    }
}

#[tokio::test]
async fn streamed_answer_arrives_frame_by_frame() {
    // Goal: an answer streamed as a head and body frames arrives in order, frame by frame, and
    // ends cleanly; a whole answer read the same way has an empty body.
    bounded(async {
        let cluster = Cluster::new();
        let server = cluster.start(Arc::new(StreamBack));
        let client = cluster.client();
        let (head, mut body) = client
            .call_answer(server.addr, Bytes::from_static(b"ab"), CALL_TIMEOUT)
            .await
            .expect("call");
        assert_eq!(head, Bytes::from_static(b"3"));
        for expected in ["ab", "abab", "ababab"] {
            let frame = body.next(CALL_TIMEOUT).await.expect("frame");
            assert_eq!(frame, Some(Bytes::from(expected)));
        }
        assert_eq!(body.next(CALL_TIMEOUT).await.expect("end"), None);
        server.stop().await;

        let echo = cluster.start(Arc::new(Echo));
        let (head, mut body) =
            client.call_answer(echo.addr, Bytes::from_static(b"hi"), CALL_TIMEOUT).await.unwrap();
        assert_eq!(head, Bytes::from_static(b"hi"));
        assert_eq!(body.next(CALL_TIMEOUT).await.expect("end"), None);
        echo.stop().await;
    })
    .await;
}

/// A server whose handler answers only when released, reporting progress every `every`.
fn start_gated(
    cluster: &Cluster,
    every: Duration,
) -> (Running, mpsc::Receiver<()>, oneshot::Sender<()>) {
    let (arrived_tx, arrived) = mpsc::channel(1);
    let (release, release_rx) = oneshot::channel();
    let gate = Gate { arrived: arrived_tx, release: Mutex::new(Some(release_rx)) };
    let limits = ServerLimits { progress_interval: every, ..ServerLimits::default() };
    let server = start_at(&cluster.identity(Role::Node(1)), localhost(), limits, Arc::new(gate))
        .expect("start server");
    (server, arrived, release)
}

#[tokio::test]
async fn a_peer_at_work_is_waited_for_past_the_timeout() {
    // Goal: while a handler works, its progress frames keep a caller waiting however long the
    // work takes (here four times the call's timeout), and the answer then arrives whole, for
    // a streamed call and a whole one alike; without progress frames the same wait fails
    // within the timeout, as for a hung peer.
    bounded(async {
        let cluster = Cluster::new();
        let timeout = Duration::from_millis(300);
        let (server, mut arrived, release) = start_gated(&cluster, Duration::from_millis(50));
        let client = cluster.client();
        let addr = server.addr;
        let mut call = tokio::spawn({
            let client = client.clone();
            async move { client.call_answer(addr, Bytes::from_static(b"big"), timeout).await }
        });
        arrived.recv().await.expect("request arrived");
        let waited = tokio::time::timeout(timeout * 4, &mut call).await;
        assert!(waited.is_err(), "the call ended while its peer was still at work");
        release.send(()).expect("handler waiting");
        let (head, mut body) = call.await.expect("call task").expect("the answer after the work");
        assert_eq!(head, Bytes::from_static(b"big"));
        assert_eq!(body.next(timeout).await.expect("end"), None);
        server.stop().await;

        let (server, mut arrived, release) = start_gated(&cluster, Duration::from_millis(50));
        let addr = server.addr;
        let call = tokio::spawn({
            let client = client.clone();
            async move { client.call(addr, Bytes::from_static(b"whole"), CALL_TIMEOUT).await }
        });
        arrived.recv().await.expect("request arrived");
        tokio::time::sleep(Duration::from_millis(200)).await; // work of four progress intervals
        release.send(()).expect("handler waiting");
        assert_eq!(call.await.expect("call task").expect("call"), Bytes::from_static(b"whole"));
        server.stop().await;

        let (server, mut arrived, release) = start_gated(&cluster, Duration::from_secs(60));
        let started = Instant::now();
        let call = client.call_answer(server.addr, Bytes::from_static(b"x"), timeout);
        let (err, _) = tokio::join!(call, arrived.recv());
        let err = err.map(|_| ()).expect_err("no progress, no head");
        assert!(matches!(err, TransportError::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
        drop(release);
        server.stop().await;
    })
    .await;
}
