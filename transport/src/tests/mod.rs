//! The crate's tests. They run real QUIC on 127.0.0.1 with port 0, each bounded in time by
//! [`bounded`]; fixtures live here, the cases in the files below.

mod auth;
mod calls;
mod cert_files;
mod frames;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::tls::ClientAuth;
use crate::{
    certs, codes, decode, encode, frame, Client, ClientLimits, Handler, HandlerFuture, Identity,
    Peer, Result, Role, Server, ServerLimits, TransportError,
};

/// No test may run longer than this, whatever goes wrong.
const TEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The timeout of calls expected to succeed: generous, loopback answers in microseconds.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

async fn bounded<F: Future>(test: F) -> F::Output {
    match tokio::time::timeout(TEST_TIMEOUT, test).await {
        Ok(output) => output,
        Err(_) => panic!("test did not finish within {TEST_TIMEOUT:?}"),
    }
}

fn localhost() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A certs directory with a fresh CA, `node-1` and `gateway` issued.
struct Cluster {
    dir: TempDir,
}

impl Cluster {
    fn new() -> Cluster {
        let dir = tempfile::tempdir().expect("temp dir");
        certs::create_ca(dir.path()).expect("create CA");
        certs::issue(dir.path(), Role::Node(1)).expect("issue node-1");
        certs::issue(dir.path(), Role::Gateway).expect("issue gateway");
        Cluster { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn identity(&self, role: Role) -> Identity {
        Identity::load(self.path(), role).expect("load identity")
    }

    fn client(&self) -> Client {
        Client::new(&self.identity(Role::Gateway), ClientLimits::default()).expect("client")
    }

    fn start(&self, handler: Arc<dyn Handler>) -> Running {
        start_at(&self.identity(Role::Node(1)), localhost(), ServerLimits::default(), handler)
            .expect("start server")
    }
}

/// Answers every request with its own payload.
struct Echo;

impl Handler for Echo {
    fn handle(&self, _peer: Peer, request: Bytes) -> HandlerFuture<'_> {
        Box::pin(async move { request })
    }
}

/// Answers with the role the server saw in the caller's certificate.
struct WhoAmI;

impl Handler for WhoAmI {
    fn handle(&self, peer: Peer, _request: Bytes) -> HandlerFuture<'_> {
        Box::pin(async move { Bytes::from(peer.role.to_string()) })
    }
}

/// A server running in a task, stopped through its token.
struct Running {
    addr: SocketAddr,
    endpoint: quinn::Endpoint,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    /// Leaves the server's port without a word to anyone, as a crashed process would: the
    /// endpoint moves to a new socket, so nothing it sends reaches a client (a client takes
    /// packets of a connection from the server's address alone) and its port is free. Moved
    /// twice: quinn keeps the socket before the last move open until traffic arrives on the
    /// new one.
    fn vanish(&self) {
        for _ in 0..2 {
            let elsewhere = std::net::UdpSocket::bind(localhost()).expect("a socket");
            self.endpoint.rebind(elsewhere).expect("rebind");
        }
    }

    /// Cancels and waits for `run` to return (it closes every connection first).
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("server task");
    }
}

fn start_at(
    identity: &Identity,
    addr: SocketAddr,
    limits: ServerLimits,
    handler: Arc<dyn Handler>,
) -> Result<Running> {
    let server = Server::bind(addr, identity, limits)?;
    let addr = server.local_addr()?;
    let endpoint = server.endpoint();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(handler, shutdown.clone()));
    Ok(Running { addr, endpoint, shutdown, task })
}

/// A client presenting whatever PEM it is given, bypassing [`Identity`]'s checks, so tests can
/// play peers a real process could never be configured as.
fn raw_client(ca_pem: &str, cert_and_key: Option<(&str, &str)>, alpn: &[u8]) -> Client {
    Client::with_auth(ClientAuth { ca_pem, cert_and_key, alpn }, ClientLimits::default(), None)
        .expect("client")
}

/// Sends `bytes` verbatim on a new stream of `client`'s connection to `addr` (no framing) and
/// finishes the stream, as a real client does, then reads one reply frame, interpreting resets
/// as `Client::call` does.
async fn raw_call(
    client: &Client,
    addr: SocketAddr,
    bytes: &[u8],
    sent_len: usize,
) -> Result<Bytes> {
    raw_exchange(client, addr, bytes, sent_len, true).await
}

/// [`raw_call`] that leaves the stream open after `bytes`, as a stalled peer would.
async fn raw_call_unfinished(
    client: &Client,
    addr: SocketAddr,
    bytes: &[u8],
    sent_len: usize,
) -> Result<Bytes> {
    raw_exchange(client, addr, bytes, sent_len, false).await
}

async fn raw_exchange(
    client: &Client,
    addr: SocketAddr,
    bytes: &[u8],
    sent_len: usize,
    finish: bool,
) -> Result<Bytes> {
    let (conn, _) = client.connection(addr).await?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(crate::error::from_connection)?;
    let interpret = |e| match e {
        TransportError::Reset { code } => codes::refusal(code, sent_len),
        other => other,
    };
    send.write_all(bytes).await.map_err(|e| interpret(crate::error::from_write(e)))?;
    if finish {
        let _ = send.finish();
    }
    frame::read_frame(&mut recv).await.map_err(interpret)
}
