//! The accepting end: one QUIC endpoint, mutual TLS against the cluster CA, one task per
//! connection and one per request stream, every wait bounded by [`ServerLimits`].

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quinn::{Connection, Endpoint, Incoming, RecvStream, SendStream, VarInt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::certs::Role;
use crate::error::{self, Result, TransportError};
use crate::{codes, frame, tls, Identity, FRAME_BYTES_MAX};

/// How long a stopping server waits for its closed connections to go idle. The close is sent at
/// once; the wait only lets it be sent again if lost. A peer that went away, or whose round-trip
/// estimate a freeze inflated, can keep a connection draining for seconds, and the node's stop
/// must fit its supervisor's grace (10 s in `sq-cloud dev`).
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// The server's bounds. Every field has a documented default; override only with a reason.
#[derive(Clone, Copy, Debug)]
pub struct ServerLimits {
    /// Connections held at once; more are refused (QUIC CONNECTION_REFUSED). Default 1024:
    /// one per gateway, peer node and operator tool, with ample room. Each costs buffers.
    pub max_connections: usize,
    /// Requests (bidirectional streams) one connection may have open at once. Default 256:
    /// a gateway's in-flight requests to one node. Beyond it the client waits for credit,
    /// which is the backpressure. Memory bound: streams × [`FRAME_BYTES_MAX`] per connection.
    pub max_streams_per_connection: u32,
    /// A connection with no traffic for this long is dropped. Default 10 s: clients send
    /// keep-alives every few seconds, so only a dead or partitioned peer stays silent this long.
    pub idle_timeout: Duration,
    /// The TLS handshake must finish within this. Default 10 s: a few round trips, even on a
    /// lossy path; a peer that stalls mid-handshake holds a connection slot no longer.
    pub handshake_timeout: Duration,
    /// The whole request frame must arrive within this. Default 10 s: far longer than a 64 MiB
    /// frame needs on the mesh, so only a stalled peer hits it.
    pub request_read_timeout: Duration,
    /// The handler must answer within this. Default 30 s: above the slowest legitimate work
    /// (a write that waits for group commit, a handoff chunk, loading or sizing a document of
    /// hundreds of MB); a caller that hears no progress gave up long before.
    pub handler_timeout: Duration,
    /// While the handler works, a progress frame goes to the caller this often (see
    /// [`crate::frame`]), so a caller that waits a short time for each frame keeps waiting for
    /// a peer at work and not for a hung one. Default 500 ms: a third of the shortest wait a
    /// caller gives a frame (the gateway's 1.5 s), leaving room for a busy machine's delays.
    pub progress_interval: Duration,
    /// The response must be written and acknowledged within this. Default 10 s, as for reads.
    pub response_write_timeout: Duration,
    /// On shutdown, in-flight requests get this long to finish before they are cut. Default 5 s.
    pub shutdown_drain_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_connections: 1024,
            max_streams_per_connection: 256,
            idle_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            request_read_timeout: Duration::from_secs(10),
            handler_timeout: Duration::from_secs(30),
            progress_interval: Duration::from_millis(500),
            response_write_timeout: Duration::from_secs(10),
            shutdown_drain_timeout: Duration::from_secs(5),
        }
    }
}

/// Who sent a request: the role from its certificate, and where it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub role: Role,
    pub addr: SocketAddr,
}

/// The future a [`Handler`] returns.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Bytes> + Send + 'a>>;

/// The body of a streamed answer: its pieces in order, each sent as one frame (so each must be
/// at most [`FRAME_BYTES_MAX`]). The server asks for the next piece only once the last one is
/// written, so a slow reader holds one piece here and QUIC's window in flight, never the body.
pub type AnswerBody = Pin<Box<dyn futures::Stream<Item = Bytes> + Send>>;

/// An answer: the head payload, and for a streamed answer the body frames that follow it.
pub struct Answer {
    pub head: Bytes,
    pub body: Option<AnswerBody>,
}

/// A body made piece by piece: `next` gets the state and gives the next piece and state, or
/// `None` at the body's end. It is called only once the last piece is written, so nothing is
/// produced ahead of the reader and no task outlives the stream.
pub fn body_unfold<S, F, Fut>(state: S, next: F) -> AnswerBody
where
    S: Send + 'static,
    F: FnMut(S) -> Fut + Send + 'static,
    Fut: Future<Output = Option<(Bytes, S)>> + Send + 'static,
{
    Box::pin(futures::stream::unfold(state, next))
}

/// The future [`Handler::handle_answer`] returns.
pub type AnswerFuture<'a> = Pin<Box<dyn Future<Output = Answer> + Send + 'a>>;

/// What the server calls once per request with the request payload; the payload it returns
/// is the response. Decoding, authorization by `peer.role` and errors are the handler's
/// business: it answers every request, errors included, with a payload of its own.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, peer: Peer, request: Bytes) -> HandlerFuture<'_>;

    /// Like [`Handler::handle`], but the answer may stream a body after its head. The server
    /// calls this one; the default streams nothing.
    fn handle_answer(&self, peer: Peer, request: Bytes) -> AnswerFuture<'_> {
        Box::pin(async move { Answer { head: self.handle(peer, request).await, body: None } })
    }
}

/// A bound QUIC endpoint that has not started accepting yet.
pub struct Server {
    endpoint: Endpoint,
    limits: ServerLimits,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port; see [`Server::local_addr`]). Needs a tokio runtime.
    pub fn bind(addr: SocketAddr, identity: &Identity, limits: ServerLimits) -> Result<Server> {
        let connections = 1..=Semaphore::MAX_PERMITS;
        if !connections.contains(&limits.max_connections) || limits.max_streams_per_connection == 0
        {
            return Err(TransportError::Config(format!("server limits out of range: {limits:?}")));
        }
        let crypto = Arc::new(tls::server_crypto(identity)?);
        let mut config = quinn::ServerConfig::with_crypto(crypto);
        config.transport_config(tls::transport(
            limits.max_streams_per_connection,
            limits.idle_timeout,
            None,
        )?);
        let socket = std::net::UdpSocket::bind(addr)?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| TransportError::Config("no async runtime for the server".into()))?;
        let endpoint =
            Endpoint::new(tls::server_endpoint(identity), Some(config), socket, runtime)?;
        Ok(Server { endpoint, limits })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    /// The endpoint, for tests that must act on its socket as a crash would.
    #[cfg(test)]
    pub(crate) fn endpoint(&self) -> Endpoint {
        self.endpoint.clone()
    }

    /// Serves until `shutdown` is cancelled, then shuts down in order: stop accepting, let
    /// in-flight requests finish (up to `shutdown_drain_timeout`), close every connection,
    /// wait for the closes to be sent. Returns when the endpoint is closed.
    pub async fn run(self, handler: Arc<dyn Handler>, shutdown: CancellationToken) {
        let permits = Arc::new(Semaphore::new(self.limits.max_connections));
        let mut connections = JoinSet::new();
        info!(addr = ?self.endpoint.local_addr().ok(), "transport server accepting");
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        warn!(peer = %incoming.remote_address(), "at max connections; refusing");
                        incoming.refuse();
                        continue;
                    };
                    let task = ConnectionTask {
                        handler: handler.clone(),
                        limits: self.limits,
                        shutdown: shutdown.clone(),
                        _permit: permit,
                    };
                    connections.spawn(task.run(incoming));
                }
                Some(done) = connections.join_next(), if !connections.is_empty() => log_join(done),
            }
        }
        self.shut_down(connections).await;
    }

    async fn shut_down(self, mut connections: JoinSet<()>) {
        info!("transport server shutting down: refusing new connections");
        self.endpoint.set_server_config(None);
        let drained = tokio::time::timeout(self.limits.shutdown_drain_timeout, async {
            while let Some(done) = connections.join_next().await {
                log_join(done);
            }
        })
        .await;
        if drained.is_err() {
            warn!(
                left = connections.len(),
                "requests still running after the drain timeout; cutting them"
            );
            connections.abort_all();
        }
        self.endpoint.close(codes::CLOSE_SHUTDOWN, b"server shutting down");
        if tokio::time::timeout(CLOSE_WAIT, self.endpoint.wait_idle()).await.is_err() {
            debug!("closed connections still draining; stopping anyway");
        }
        info!("transport server stopped");
    }
}

fn log_join(done: std::result::Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            error!("transport task panicked: {e}");
        }
    }
}

/// Whether a handshake ended because the peer stopped trying, not because either side refused
/// the other. A node thawed from a pause finds its peers' connection attempts queued, which
/// they gave up on long before: they close or reset them, dozens at once. A refused
/// certificate is a close with a TLS alert (a QUIC crypto error), and stays a warning.
fn peer_gave_up(e: &quinn::ConnectionError) -> bool {
    use quinn::ConnectionError as E;
    /// QUIC's CRYPTO_ERROR codes: 0x100 plus the TLS alert (RFC 9000, section 20.1).
    const CRYPTO_ERRORS: std::ops::RangeInclusive<u64> = 0x100..=0x1ff;
    match e {
        E::ConnectionClosed(close) => !CRYPTO_ERRORS.contains(&u64::from(close.error_code)),
        E::ApplicationClosed(_) | E::Reset | E::TimedOut => true,
        _ => false,
    }
}

/// Everything one connection's task owns. Dropping it returns the connection permit.
struct ConnectionTask {
    handler: Arc<dyn Handler>,
    limits: ServerLimits,
    shutdown: CancellationToken,
    _permit: OwnedSemaphorePermit,
}

impl ConnectionTask {
    async fn run(self, incoming: Incoming) {
        let remote = incoming.remote_address();
        let conn = match tokio::time::timeout(self.limits.handshake_timeout, incoming).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) if peer_gave_up(&e) => return debug!(%remote, "handshake abandoned: {e}"),
            Ok(Err(e)) => return warn!(%remote, "handshake failed: {e}"),
            Err(_) => return debug!(%remote, "handshake timed out"),
        };
        let role = match tls::peer_role(&conn) {
            Ok(role) => role,
            Err(e) => {
                warn!(%remote, "refusing peer: {e}");
                return conn.close(codes::CLOSE_UNKNOWN_ROLE, b"certificate names no known role");
            }
        };
        let peer = Peer { role, addr: remote };
        debug!(?peer, "connection accepted");
        self.serve(conn, peer).await;
    }

    /// Accepts request streams until the connection ends or shutdown, then drains them.
    async fn serve(self, conn: Connection, peer: Peer) {
        let mut streams = JoinSet::new();
        loop {
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                accepted = conn.accept_bi() => match accepted {
                    Ok((send, recv)) => {
                        let handler = self.handler.clone();
                        let stream = StreamTask { handler, limits: self.limits, peer };
                        streams.spawn(stream.run(send, recv));
                    }
                    Err(e) => {
                        debug!(?peer, "connection ended: {e}");
                        break;
                    }
                },
                Some(done) = streams.join_next(), if !streams.is_empty() => log_join(done),
            }
        }
        // Every stream task is bounded by the read, handler and write timeouts.
        while let Some(done) = streams.join_next().await {
            log_join(done);
        }
        if self.shutdown.is_cancelled() {
            conn.close(codes::CLOSE_SHUTDOWN, b"server shutting down");
        }
    }
}

/// One request: read a frame, call the handler, write a frame.
struct StreamTask {
    handler: Arc<dyn Handler>,
    limits: ServerLimits,
    peer: Peer,
}

impl StreamTask {
    async fn run(self, mut send: SendStream, mut recv: RecvStream) {
        let request = match tokio::time::timeout(
            self.limits.request_read_timeout,
            frame::read_frame(&mut recv),
        )
        .await
        {
            Ok(Ok(request)) => request,
            Ok(Err(e)) => return refuse(&mut send, &mut recv, &e, self.peer),
            Err(_) => return abort(&mut send, &mut recv, codes::STREAM_READ_TIMEOUT),
        };
        let Some(response) = self.answer(&mut send, request).await else {
            warn!(peer = ?self.peer, "handler timed out");
            return abort(&mut send, &mut recv, codes::STREAM_HANDLER_TIMEOUT);
        };
        let written = respond(&mut send, response, self.limits.response_write_timeout).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(peer = ?self.peer, "response not delivered: {e}"),
            Err(_) => abort(&mut send, &mut recv, VarInt::from_u32(0)),
        }
    }

    /// The handler's answer, or `None` past the handler timeout. Until it comes, a progress
    /// frame goes out every [`ServerLimits::progress_interval`]; once one cannot be written
    /// (the caller left) no more are tried, and the handler still runs to its end as it would
    /// without them, so whatever it holds is released the same way.
    async fn answer(&self, send: &mut SendStream, request: Bytes) -> Option<Answer> {
        let handling = self.handler.handle_answer(self.peer, request);
        tokio::pin!(handling);
        let deadline = tokio::time::sleep(self.limits.handler_timeout);
        tokio::pin!(deadline);
        let every = self.limits.progress_interval;
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut reporting = true;
        loop {
            tokio::select! {
                answer = &mut handling => return Some(answer),
                () = &mut deadline => return None,
                _ = ticks.tick(), if reporting => {
                    let write = frame::write_progress(send);
                    let written = tokio::time::timeout(self.limits.response_write_timeout, write);
                    if !matches!(written.await, Ok(Ok(()))) {
                        debug!(peer = ?self.peer, "progress not delivered; the caller left");
                        reporting = false;
                    }
                }
            }
        }
    }
}

/// Writes the answer (its head, then each body piece as a frame) and waits until the peer has
/// acknowledged it, so a shutdown that closes the connection right after cannot drop an
/// answered request's response. Every frame, and the final acknowledgement, must make progress
/// within `progress`: a body may take as long as it needs, a stalled reader no longer.
async fn respond(send: &mut SendStream, answer: Answer, progress: Duration) -> Result<Result<()>> {
    let timed_out = || TransportError::Timeout { what: "response write" };
    let Answer { head, body } = answer;
    match tokio::time::timeout(progress, write_head(send, head)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Ok(Err(e)),
        Err(_) => return Err(timed_out()),
    }
    if let Some(mut body) = body {
        use futures::StreamExt;
        while let Some(piece) = body.next().await {
            match tokio::time::timeout(progress, frame::write_frame(send, piece)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Ok(Err(e)),
                Err(_) => return Err(timed_out()),
            }
        }
    }
    // Only fails if the stream was already finished or reset, which we did not do.
    let _ = send.finish();
    match tokio::time::timeout(progress, send.stopped()).await {
        Ok(r) => Ok(r.map(|_| ()).map_err(|e| TransportError::Closed { reason: e.to_string() })),
        Err(_) => Err(timed_out()),
    }
}

/// Writes an answer's head frame.
async fn write_head(send: &mut SendStream, response: Bytes) -> Result<()> {
    if response.len() > FRAME_BYTES_MAX {
        // A handler bug, not the peer's fault. Sending just the header lets the client fail
        // with FrameTooLarge and the true length instead of a bare reset.
        error!(len = response.len(), "handler returned a response over FRAME_BYTES_MAX");
        let len = u32::try_from(response.len()).unwrap_or(u32::MAX);
        let header = frame::raw_header(crate::PROTOCOL_VERSION, len);
        send.write_all(&header).await.map_err(error::from_write)?;
    } else {
        frame::write_frame(send, response).await?;
    }
    Ok(())
}

/// Refuses a request whose frame could not be read, telling the client why with a code.
fn refuse(send: &mut SendStream, recv: &mut RecvStream, error: &TransportError, peer: Peer) {
    let code = match error {
        TransportError::FrameTooLarge { .. } => codes::STREAM_FRAME_TOO_LARGE,
        TransportError::VersionMismatch { .. } => codes::version_mismatch_code(),
        TransportError::Malformed { .. } => codes::STREAM_MALFORMED,
        // The stream or connection is already gone; nobody is listening for a code.
        _ => return debug!(?peer, "request not read: {error}"),
    };
    warn!(?peer, "refusing request: {error}");
    abort(send, recv, code);
}

fn abort(send: &mut SendStream, recv: &mut RecvStream, code: VarInt) {
    // Both fail only if that direction is already closed, which is the goal anyway.
    let _ = send.reset(code);
    let _ = recv.stop(code);
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::{ConnectionClose, ConnectionError, TransportErrorCode};

    fn closed(error_code: TransportErrorCode) -> ConnectionError {
        ConnectionError::ConnectionClosed(ConnectionClose {
            error_code,
            frame_type: None,
            reason: Default::default(),
        })
    }

    #[test]
    fn a_peer_that_stopped_trying_is_told_from_a_refused_certificate() {
        assert!(peer_gave_up(&ConnectionError::Reset));
        assert!(peer_gave_up(&ConnectionError::TimedOut));
        assert!(peer_gave_up(&closed(TransportErrorCode::NO_ERROR)));
        assert!(peer_gave_up(&closed(TransportErrorCode::CONNECTION_REFUSED)));
        // TLS alerts 42 (bad_certificate) and 48 (unknown_ca): a refusal, not a retreat.
        assert!(!peer_gave_up(&closed(TransportErrorCode::crypto(42))));
        assert!(!peer_gave_up(&closed(TransportErrorCode::crypto(48))));
        assert!(!peer_gave_up(&ConnectionError::LocallyClosed));
        assert!(!peer_gave_up(&ConnectionError::VersionMismatch));
    }
}
