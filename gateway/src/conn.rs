//! One client connection, TLS or plain, from accept to close, under its timeouts.
//!
//! The timeouts are the gateway's own rather than hyper's `header_read_timeout`: hyper starts
//! that clock when it waits for a head, so it counts a keep-alive connection's idle time as
//! header time and cannot tell the two limits apart. Here each connection is in one phase:
//! - `Head`: bytes of a request head are arriving (for a new connection: from its accept, or
//!   the end of its TLS handshake); closed after the header-read timeout;
//! - `Busy`: requests are being answered (counted by the service); no timeout here, the
//!   answer's own limits apply;
//! - `Idle`: the last answer is complete and no byte has arrived since; closed after the idle
//!   timeout.
//!
//! A watchdog beside hyper's connection future sleeps until the phase's deadline and drops the
//! connection when it passes. Phase changes never wake it (that would cost a task wake per
//! request): it never sleeps longer than the shorter timeout, and every deadline a later phase
//! change can set is at least that far away, so none is missed.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderValue, Request, Response};
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::head::{self, CloseRule, HEAD_BYTES_MAX};
use crate::lograte::Tally;
use crate::HttpLimits;

/// Bytes asked of the socket per read while the first head arrives: one MTU-sized head in one
/// read, a larger one in a few.
const HEAD_READ_CHUNK_BYTES: usize = 4096;

/// The answer to a first head over [`HEAD_BYTES_MAX`] (hyper answers a later one the same way).
const HEAD_TOO_LARGE: &[u8] =
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

static HANDSHAKE_TIMEOUTS: Tally = Tally::new();
static HEAD_TIMEOUTS: Tally = Tally::new();

/// The timeouts of [`HttpLimits`] as durations.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub tls_handshake: Duration,
    pub header_read: Duration,
    pub idle: Duration,
    pub body_read: Duration,
}

impl From<&HttpLimits> for Timeouts {
    fn from(l: &HttpLimits) -> Self {
        Timeouts {
            tls_handshake: Duration::from_millis(l.tls_handshake_timeout_ms),
            header_read: Duration::from_millis(l.header_read_timeout_ms),
            idle: Duration::from_millis(l.idle_timeout_ms),
            body_read: Duration::from_millis(l.body_read_timeout_ms),
        }
    }
}

/// What every connection of one listener shares.
#[derive(Clone)]
pub struct Listener {
    pub app: axum::Router,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub timeouts: Timeouts,
    pub close: CloseRule,
}

/// Serves one accepted connection until it closes, times out, or `shutdown` ends it (an answer
/// in progress is finished first).
pub async fn serve(
    listener: Listener,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    let Some(acceptor) = listener.tls.clone() else {
        return serve_stream(&listener, tcp, false, peer, shutdown).await;
    };
    let stream = match tokio::time::timeout(listener.timeouts.tls_handshake, acceptor.accept(tcp))
        .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => {
            closed("tls_handshake_timeout");
            if let Some(n) = HANDSHAKE_TIMEOUTS.note() {
                tracing::info!(count = n, %peer, "TLS handshakes timed out (latest peer shown)");
            }
            return;
        }
    };
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    serve_stream(&listener, stream, h2, peer, shutdown).await
}

async fn serve_stream<S>(
    listener: &Listener,
    mut stream: S,
    h2: bool,
    peer: SocketAddr,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let started = Instant::now();
    let state = Arc::new(ConnState { phase: Mutex::new(Phase::Head(started)), h2 });
    let (prefix, repaired) = match h2 {
        true => (Bytes::new(), false),
        false => match first_head(listener, &mut stream, started, peer, &shutdown).await {
            Some(first) => first,
            None => return,
        },
    };
    let io = Watched { inner: stream, prefix, state: state.clone() };
    let service = ConnService {
        app: listener.app.clone(),
        state: state.clone(),
        close: listener.close,
        body_read: listener.timeouts.body_read,
        first_repaired: Arc::new(std::sync::atomic::AtomicBool::new(repaired)),
    };
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let recheck = listener.timeouts.header_read.min(listener.timeouts.idle);
    let mut stopping = false;
    loop {
        let now = Instant::now();
        let deadline = state.deadline(&listener.timeouts);
        if deadline.is_some_and(|d| d <= now) {
            let idle = state.with(|p| matches!(p, Phase::Idle(_)));
            closed(if idle { "idle_timeout" } else { "header_timeout" });
            return tracing::debug!(%peer, idle, "connection timed out");
        }
        let wake = deadline.map_or(now + recheck, |d| d.min(now + recheck));
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = shutdown.cancelled(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Reads an HTTP/1 connection's first request head, within the header timeout: the bytes for
/// hyper to start from (the head, with bytes HTTP forbids in its request target
/// percent-encoded, and whatever followed it) and whether the target needed that. `None` once the connection is done: the
/// client closed, the head was too large (answered 431) or late, or the gateway is stopping.
async fn first_head<S>(
    listener: &Listener,
    stream: &mut S,
    started: Instant,
    peer: SocketAddr,
    shutdown: &CancellationToken,
) -> Option<(Bytes, bool)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let deadline = tokio::time::Instant::from_std(started + listener.timeouts.header_read);
    let first = tokio::select! {
        r = tokio::time::timeout_at(deadline, read_first_head(&mut *stream)) => r,
        _ = shutdown.cancelled() => return None,
    };
    match first {
        Ok(Ok(FirstHead::Complete { head, rest })) => {
            let fixed = head::repair_request_line(&head);
            let repaired = fixed.is_some();
            let mut bytes = fixed.unwrap_or(head);
            bytes.extend_from_slice(&rest);
            Some((Bytes::from(bytes), repaired))
        }
        Ok(Ok(FirstHead::TooLarge)) => {
            let _ = stream.write_all(HEAD_TOO_LARGE).await;
            None
        }
        // The client closed, or sent bytes after which no head can end: hyper judges them.
        Ok(Ok(FirstHead::Partial(bytes))) => Some((Bytes::from(bytes), false)),
        Ok(Err(_)) => None,
        Err(_) => {
            closed("header_timeout");
            if let Some(n) = HEAD_TIMEOUTS.note() {
                tracing::info!(count = n, %peer, "request heads timed out (latest peer shown)");
            }
            None
        }
    }
}

/// Counts a connection closed by one of the limits, by reason (a fixed set of labels).
pub fn closed(reason: &'static str) {
    metrics::counter!("sq_gateway_connections_closed_total", "reason" => reason).increment(1);
}

enum FirstHead {
    /// The head (up to its blank line) and whatever followed it in the same reads.
    Complete {
        head: Vec<u8>,
        rest: Vec<u8>,
    },
    /// The stream ended before a head did.
    Partial(Vec<u8>),
    TooLarge,
}

/// Reads until the first head is complete, the stream ends, or the head passes its limit.
async fn read_first_head<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<FirstHead> {
    let mut buf = Vec::with_capacity(HEAD_READ_CHUNK_BYTES);
    loop {
        let start = buf.len();
        buf.resize(start + HEAD_READ_CHUNK_BYTES, 0);
        let n = stream.read(&mut buf[start..]).await?;
        buf.truncate(start + n);
        if n == 0 {
            return Ok(FirstHead::Partial(buf));
        }
        // A blank line can straddle two reads: look from three bytes before the new ones.
        if let Some(end) = head::head_end(&buf[start.saturating_sub(3)..]) {
            let end = start.saturating_sub(3) + end;
            if end > HEAD_BYTES_MAX {
                return Ok(FirstHead::TooLarge);
            }
            let rest = buf.split_off(end);
            return Ok(FirstHead::Complete { head: buf, rest });
        }
        if buf.len() > HEAD_BYTES_MAX {
            return Ok(FirstHead::TooLarge);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Idle(Instant),
    Head(Instant),
    Busy(usize),
}

/// The phase of one connection, shared by its I/O, its service and its watchdog.
struct ConnState {
    phase: Mutex<Phase>,
    /// HTTP/2 carries pings and settings between requests: bytes alone do not start a head.
    h2: bool,
}

impl ConnState {
    fn with<T>(&self, f: impl FnOnce(&mut Phase) -> T) -> T {
        f(&mut self.phase.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn on_bytes(&self) {
        if !self.h2 {
            self.with(|p| {
                if let Phase::Idle(_) = p {
                    *p = Phase::Head(Instant::now());
                }
            })
        }
    }

    fn begin(self: &Arc<Self>) -> BusyGuard {
        self.with(|p| {
            *p = match *p {
                Phase::Busy(n) => Phase::Busy(n + 1),
                _ => Phase::Busy(1),
            }
        });
        BusyGuard(self.clone())
    }

    fn deadline(&self, t: &Timeouts) -> Option<Instant> {
        self.with(|p| match *p {
            Phase::Idle(since) => Some(since + t.idle),
            Phase::Head(since) => Some(since + t.header_read),
            Phase::Busy(_) => None,
        })
    }
}

/// One request in progress; dropped when its answer's body is done.
struct BusyGuard(Arc<ConnState>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.with(|p| {
            if let Phase::Busy(n) = *p {
                *p = if n <= 1 { Phase::Idle(Instant::now()) } else { Phase::Busy(n - 1) };
            }
        })
    }
}

/// The socket, with the first head replayed before it, noting each arrival of bytes.
struct Watched<S> {
    inner: S,
    prefix: Bytes,
    state: Arc<ConnState>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let chunk = self.prefix.split_to(n);
            buf.put_slice(&chunk);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.on_bytes();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The router, with each request counted busy until its answer is sent, and `Connection:
/// close` on answers to clients that read to the end of the stream ([`CloseRule`]).
#[derive(Clone)]
struct ConnService {
    app: axum::Router,
    state: Arc<ConnState>,
    close: CloseRule,
    body_read: Duration,
    first_repaired: Arc<std::sync::atomic::AtomicBool>,
}

type ServiceFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ServiceFuture;

    fn call(&self, request: Request<Incoming>) -> ServiceFuture {
        let guard = self.state.begin();
        let repaired = self.first_repaired.swap(false, std::sync::atomic::Ordering::Relaxed);
        let close = self.close.close_after(request.version(), request.headers(), repaired);
        let body_read = self.body_read;
        let request = request.map(|body| Body::new(TimedBody::new(body, body_read)));
        let answer = self.app.clone().oneshot(request);
        Box::pin(async move {
            let mut response = answer.await?;
            if close {
                response
                    .headers_mut()
                    .insert(axum::http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok(response.map(|body| Body::new(Tracked { body, _guard: guard })))
        })
    }
}

/// An answer's body that keeps its request counted busy until hyper has sent it all.
struct Tracked {
    body: Body,
    _guard: BusyGuard,
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body past its deadline: the body-read timeout ([`Timeouts::body_read`]) ran out
/// before its last byte arrived.
#[derive(Debug)]
pub struct BodyTimeout {
    pub limit: Duration,
}

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the body did not arrive within {:?}", self.limit)
    }
}

impl std::error::Error for BodyTimeout {}

/// A request's body that must arrive whole within `limit` of its head: past it, the next read
/// fails with [`BodyTimeout`] (the handler answers 408, and hyper closes the connection, whose
/// body was not read to its end). The timer runs only while the handler waits for bytes.
struct TimedBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
}

impl TimedBody {
    fn new(inner: Incoming, limit: Duration) -> TimedBody {
        TimedBody { inner, deadline: Box::pin(tokio::time::sleep(limit)), limit }
    }
}

impl hyper::body::Body for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    closed("body_timeout");
                    Poll::Ready(Some(Err(Box::new(BodyTimeout { limit: self.limit }))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
