//! The calling end: one long-lived QUIC connection per peer address, one bidirectional
//! stream per call. Cheap to clone; clones share the pool.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use quinn::{Connection, Endpoint};
use serde::{de::DeserializeOwned, Serialize};
use tracing::debug;

use crate::error::{self, Result, TransportError};
use crate::tls::{self, ClientAuth};
use crate::{codes, frame, Identity, FRAME_BYTES_MAX, SERVER_NAME};

/// The pieces a request is sent in by [`Client::call_answer`], each within the call's timeout:
/// 1 MiB, a few milliseconds of a healthy link, so only a peer that stopped taking bytes fails.
pub const REQUEST_PIECE_BYTES: usize = 1 << 20;

/// Extra time [`Client::call_answer`] waits for an answer per MiB of request: 1 s. A node checks,
/// logs and applies a MiB in about 0.6 s in a debug build on a machine shared by several builds
/// (measured: a 4 MiB write took 2.2 s inside the node, an 8 MiB one 5.0 s), a small part of it
/// in a release build; the allowance keeps a large request its node is still working on from
/// being cut for its size, while a hung node still fails a small request in the bare timeout.
pub const ANSWER_WAIT_PER_MIB: Duration = Duration::from_secs(1);

/// The longest [`Client::call_answer`] waits for an answer's head while its peer keeps sending
/// progress frames (each within the call's timeout): 60 s, twice the server's default
/// [`crate::ServerLimits::handler_timeout`], so an honest peer gives up on its own work first and
/// only a peer that reports progress forever is cut here.
pub const ANSWER_HEAD_WAIT_MAX: Duration = Duration::from_secs(60);

/// [`ANSWER_WAIT_PER_MIB`] for a request of `len` bytes, in proportion to its size: a small
/// request gets next to nothing, a 1 MB one almost a second.
fn answer_wait(len: usize) -> Duration {
    ANSWER_WAIT_PER_MIB.mul_f64(len as f64 / (1u64 << 20) as f64)
}

/// The client's bounds. Every field has a documented default.
#[derive(Clone, Copy, Debug)]
pub struct ClientLimits {
    /// A new connection's handshake must finish within this. Default 3 s: a few round trips on
    /// the mesh; beyond it the peer is treated as down and the caller answers 503 promptly.
    pub connect_timeout: Duration,
    /// A pooled connection with no traffic for this long is dropped. Default 10 s, as on the
    /// server (the smaller of the two wins).
    pub idle_timeout: Duration,
    /// How often an idle pooled connection sends a keep-alive. Default 2 s: well under the
    /// idle timeout, so a live peer's connection survives quiet periods and a dead peer's is
    /// found and dropped within the idle timeout.
    pub keep_alive_interval: Duration,
    /// Peer addresses pooled at once. Default 1024: far above a cluster's node count. When
    /// full, closed entries are pruned; if none are, the call fails with `Connect`.
    pub max_peers: usize,
    /// Time every call waits before its request leaves, inside its timeout: a round trip added
    /// to rehearse a mesh spread over a WAN on one machine (this kernel has no netem). Default
    /// 0, or [`ADDED_RTT_ENV`] milliseconds when that is set; a client with a delay logs it.
    /// Never for production.
    pub added_rtt: Duration,
}

/// The environment variable that sets [`ClientLimits::added_rtt`] by default, in milliseconds,
/// for every process of a cluster started with it (`sq-cloud dev` passes its environment on).
pub const ADDED_RTT_ENV: &str = "SQ_CLOUD_ADDED_RTT_MS";

/// [`ADDED_RTT_ENV`], if set to a number of milliseconds.
fn added_rtt_from_env() -> Duration {
    std::env::var(ADDED_RTT_ENV)
        .ok()
        .and_then(|ms| ms.trim().parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_millis)
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            connect_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(10),
            keep_alive_interval: Duration::from_secs(2),
            max_peers: 1024,
            added_rtt: added_rtt_from_env(),
        }
    }
}

/// Counters for tests and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientStats {
    /// Connections completed since the client was made (a reconnect counts again).
    pub connections_opened: u64,
    /// Peer addresses currently in the pool.
    pub pooled_peers: usize,
}

/// One pooled peer. The async lock is held while connecting, so concurrent first calls to
/// a peer share one handshake instead of racing to open many connections.
type PeerSlot = Arc<tokio::sync::Mutex<Option<Connection>>>;

/// A pooled QUIC client. Clone it freely.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: Endpoint,
    config: quinn::ClientConfig,
    limits: ClientLimits,
    peers: Mutex<HashMap<SocketAddr, PeerSlot>>,
    connections_opened: AtomicU64,
}

impl Client {
    /// A client presenting `identity`. Binds one UDP socket on every interface; needs a tokio
    /// runtime. Prefer [`Client::for_peers`] when the peers are known.
    pub fn new(identity: &Identity, limits: ClientLimits) -> Result<Client> {
        Client::with_auth(ClientAuth::of(identity), limits, None)
    }

    /// A client for peers at `peers`: its socket binds only loopback when every peer is on
    /// loopback (a dev cluster then opens no port on the network), else every interface.
    pub fn for_peers(
        identity: &Identity,
        limits: ClientLimits,
        peers: &[IpAddr],
    ) -> Result<Client> {
        Client::with_auth(ClientAuth::of(identity), limits, loopback_bind(peers))
    }

    pub(crate) fn with_auth(
        auth: ClientAuth<'_>,
        limits: ClientLimits,
        bind: Option<SocketAddr>,
    ) -> Result<Client> {
        if limits.max_peers == 0 || limits.keep_alive_interval >= limits.idle_timeout {
            return Err(TransportError::Config(
                "client limits need max_peers > 0 and keep-alive shorter than idle timeout".into(),
            ));
        }
        if !limits.added_rtt.is_zero() {
            tracing::warn!(
                added_rtt_ms = limits.added_rtt.as_millis() as u64,
                "every call waits this long before it leaves ({ADDED_RTT_ENV}): a rehearsal setting"
            );
        }
        let crypto = Arc::new(tls::client_crypto(auth)?);
        let mut config = quinn::ClientConfig::new(crypto);
        config.transport_config(tls::transport(
            0,
            limits.idle_timeout,
            Some(limits.keep_alive_interval),
        )?);
        // Dual-stack where the host allows it, else IPv4 only.
        let endpoint = match bind {
            Some(addr) => Endpoint::client(addr)?,
            None => Endpoint::client(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)))
                .or_else(|_| Endpoint::client(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))))?,
        };
        let inner = Inner {
            endpoint,
            config,
            limits,
            peers: Mutex::new(HashMap::new()),
            connections_opened: AtomicU64::new(0),
        };
        Ok(Client { inner: Arc::new(inner) })
    }

    /// Sends `request` to `addr` and returns the response payload, all within `timeout`.
    pub async fn call(&self, addr: SocketAddr, request: Bytes, timeout: Duration) -> Result<Bytes> {
        if request.len() > FRAME_BYTES_MAX {
            return Err(TransportError::FrameTooLarge {
                len: request.len() as u64,
                limit: FRAME_BYTES_MAX as u64,
            });
        }
        match tokio::time::timeout(timeout, self.call_unbounded(addr, request)).await {
            Ok(result) => result,
            Err(_) => {
                // The peer may have been replaced by a process that cannot reset our old
                // connection (a node started again resets it at once, `tls::server_endpoint`,
                // but one with other key files cannot), which would otherwise look alive until
                // the idle timeout. Later calls get a fresh connection; calls still running on
                // the old one keep it.
                self.unpool(addr);
                Err(TransportError::Timeout { what: "call" })
            }
        }
    }

    /// Like [`Client::call`], but the answer may stream a body after its head: returns the head,
    /// and a [`BodyReader`] for the frames that follow (none for a whole answer). The caller
    /// knows from the head whether a body follows.
    ///
    /// `timeout` bounds each step rather than the whole, so a large request is never cut for
    /// its size while its peer keeps up: the connection and stream must open within it; the
    /// request is sent [`REQUEST_PIECE_BYTES`] at a time, each piece taken within it (a stalled
    /// or dead peer stops taking them); and the answer's first frame must come within it after
    /// the request is sent, plus [`ANSWER_WAIT_PER_MIB`] per MiB the request carries, since the
    /// peer checks and stores every byte before it answers. That first frame may be a progress
    /// frame (the peer's handler is still at work, e.g. loading or sizing a large document):
    /// then the next must come within the same wait, and the head within
    /// [`ANSWER_HEAD_WAIT_MAX`] in all. So a peer that works is waited for however long its
    /// answer takes to start, and a hung one still fails within the timeout.
    pub async fn call_answer(
        &self,
        addr: SocketAddr,
        request: Bytes,
        timeout: Duration,
    ) -> Result<(Bytes, BodyReader)> {
        if request.len() > FRAME_BYTES_MAX {
            return Err(TransportError::FrameTooLarge {
                len: request.len() as u64,
                limit: FRAME_BYTES_MAX as u64,
            });
        }
        let opened = tokio::time::timeout(timeout, async {
            self.added_rtt().await;
            let (conn, fresh) = self.connection(addr).await?;
            match conn.open_bi().await {
                Ok(streams) => Ok(streams),
                // As in `call`: a pooled connection that died since its last use is replaced.
                Err(_) if !fresh => {
                    let (conn, _) = self.connection(addr).await?;
                    conn.open_bi().await.map_err(error::from_connection)
                }
                Err(e) => Err(error::from_connection(e)),
            }
        });
        let timed_out = |what: &'static str| {
            self.unpool(addr);
            TransportError::Timeout { what }
        };
        let (mut send, mut recv) = opened.await.map_err(|_| timed_out("call"))??;
        let request_len = request.len();
        let interpret = |e: TransportError| match e {
            TransportError::Reset { code } => codes::refusal(code, request_len),
            other => other,
        };
        let mut pieces = vec![Bytes::copy_from_slice(&frame::header(request_len)?)];
        let mut rest = request;
        while !rest.is_empty() {
            pieces.push(rest.split_to(rest.len().min(REQUEST_PIECE_BYTES)));
        }
        for piece in pieces {
            tokio::time::timeout(timeout, send.write_chunk(piece))
                .await
                .map_err(|_| timed_out("request write"))?
                .map_err(|e| interpret(error::from_write(e)))?;
        }
        // Only fails if the stream is already finished or reset; the read below reports why.
        let _ = send.finish();
        let wait = timeout + answer_wait(request_len);
        let deadline = tokio::time::Instant::now() + ANSWER_HEAD_WAIT_MAX;
        loop {
            let frame = tokio::time::timeout(wait, frame::read_head_frame(&mut recv))
                .await
                .map_err(|_| timed_out("call"))?
                .map_err(interpret)?;
            if let frame::BeforeHead::Head(head) = frame {
                return Ok((head, BodyReader { recv: Some(recv) }));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(timed_out("answer head"));
            }
        }
    }

    /// Takes the connection to `addr` out of the pool without closing it.
    fn unpool(&self, addr: SocketAddr) {
        self.inner.peers.lock().unwrap_or_else(PoisonError::into_inner).remove(&addr);
    }

    /// [`Client::call`] with bincode encoding of the request and decoding of the response.
    pub async fn call_typed<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        addr: SocketAddr,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp> {
        let request = Bytes::from(frame::encode(request)?);
        frame::decode(&self.call(addr, request, timeout).await?)
    }

    /// Drops the pooled connection to `addr`, if any (e.g. the node left the cluster).
    pub fn forget(&self, addr: SocketAddr) {
        let slot = self.inner.peers.lock().unwrap_or_else(PoisonError::into_inner).remove(&addr);
        // A slot that is locked is mid-connect; its connection closes when its callers drop it.
        if let Some(conn) = slot.as_ref().and_then(|s| s.try_lock().ok()).and_then(|mut c| c.take())
        {
            conn.close(codes::CLOSE_FORGOTTEN, b"forgotten");
        }
    }

    /// The address of the client's UDP socket.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.inner.endpoint.local_addr()?)
    }

    pub fn stats(&self) -> ClientStats {
        ClientStats {
            connections_opened: self.inner.connections_opened.load(Ordering::Relaxed),
            pooled_peers: self.inner.peers.lock().unwrap_or_else(PoisonError::into_inner).len(),
        }
    }

    /// Waits [`ClientLimits::added_rtt`], if any.
    async fn added_rtt(&self) {
        let rtt = self.inner.limits.added_rtt;
        if !rtt.is_zero() {
            tokio::time::sleep(rtt).await;
        }
    }

    async fn call_unbounded(&self, addr: SocketAddr, request: Bytes) -> Result<Bytes> {
        self.added_rtt().await;
        let (conn, fresh) = self.connection(addr).await?;
        let streams = match conn.open_bi().await {
            Ok(streams) => streams,
            // A pooled connection that died since its last use: nothing was sent, so one
            // retry on a new connection is safe.
            Err(e) if !fresh => {
                debug!(%addr, "pooled connection lost ({e}); reconnecting");
                let (conn, _) = self.connection(addr).await?;
                conn.open_bi().await.map_err(error::from_connection)?
            }
            Err(e) => return Err(error::from_connection(e)),
        };
        exchange(streams, request).await
    }

    /// The pooled connection to `addr`, opened if missing or closed; `true` if just opened.
    pub(crate) async fn connection(&self, addr: SocketAddr) -> Result<(Connection, bool)> {
        let slot = self.slot(addr)?;
        let mut pooled = slot.lock().await;
        if let Some(conn) = pooled.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok((conn.clone(), false));
        }
        *pooled = None;
        let conn = self.connect(addr).await?;
        *pooled = Some(conn.clone());
        Ok((conn, true))
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Connection> {
        let inner = &self.inner;
        let connecting = inner
            .endpoint
            .connect_with(inner.config.clone(), addr, SERVER_NAME)
            .map_err(|e| TransportError::Connect { addr, reason: e.to_string() })?;
        let conn = tokio::time::timeout(inner.limits.connect_timeout, connecting)
            .await
            .map_err(|_| TransportError::Connect {
                addr,
                reason: format!("no handshake within {:?}", inner.limits.connect_timeout),
            })?
            .map_err(|e| error::from_handshake(addr, e))?;
        inner.connections_opened.fetch_add(1, Ordering::Relaxed);
        debug!(%addr, "connected");
        Ok(conn)
    }

    fn slot(&self, addr: SocketAddr) -> Result<PeerSlot> {
        let mut peers = self.inner.peers.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = peers.get(&addr) {
            return Ok(slot.clone());
        }
        if peers.len() >= self.inner.limits.max_peers {
            peers.retain(|_, slot| !is_idle_and_closed(slot));
        }
        if peers.len() >= self.inner.limits.max_peers {
            return Err(TransportError::Connect {
                addr,
                reason: format!("client pool full ({} peers)", self.inner.limits.max_peers),
            });
        }
        Ok(peers.entry(addr).or_default().clone())
    }
}

/// The loopback address of the peers' family, when every peer is on loopback of one family;
/// `None` (every interface) otherwise.
pub(crate) fn loopback_bind(peers: &[IpAddr]) -> Option<SocketAddr> {
    let all = |f: fn(&IpAddr) -> bool| !peers.is_empty() && peers.iter().all(f);
    if all(|ip| ip.is_loopback() && ip.is_ipv4()) {
        Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
    } else if all(|ip| ip.is_loopback() && ip.is_ipv6()) {
        Some(SocketAddr::from((Ipv6Addr::LOCALHOST, 0)))
    } else {
        None
    }
}

/// The body frames of a streamed answer, read one at a time: the reader holds at most one
/// frame, and QUIC's flow control holds the sender back until it is read.
pub struct BodyReader {
    recv: Option<quinn::RecvStream>,
}

impl BodyReader {
    /// A body with no frames: the answer of a peer that does not stream.
    pub fn empty() -> BodyReader {
        BodyReader { recv: None }
    }

    /// The next body frame, or `None` at the body's end; each must arrive within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Result<Option<Bytes>> {
        let Some(recv) = self.recv.as_mut() else { return Ok(None) };
        let frame = tokio::time::timeout(timeout, frame::read_body_frame(recv))
            .await
            .map_err(|_| TransportError::Timeout { what: "answer body" })??;
        if frame.is_none() {
            self.recv = None;
        }
        Ok(frame)
    }

    /// Ends a body that has no frames (the head was the whole answer) without telling the peer
    /// anything. A stream dropped before its end is read makes quinn send the peer a
    /// STOP_SENDING, and the peer acknowledge it: two packets more per answer. So the end is
    /// read here if it has already arrived (it comes with the head unless the network split
    /// them); if it has not, or bytes follow, the stream is dropped as before.
    pub fn close(mut self) {
        if let Some(recv) = self.recv.as_mut() {
            let _ = recv.read_chunk(1, true).now_or_never();
        }
    }
}

/// A slot nobody is using whose connection is gone (or was never made).
fn is_idle_and_closed(slot: &PeerSlot) -> bool {
    slot.try_lock().is_ok_and(|c| c.as_ref().is_none_or(|c| c.close_reason().is_some()))
}

/// One request on one stream: write the frame, finish, read the reply frame (after any progress
/// frames; the caller's timeout bounds the whole).
async fn exchange(
    (mut send, mut recv): (quinn::SendStream, quinn::RecvStream),
    request: Bytes,
) -> Result<Bytes> {
    let request_len = request.len();
    let interpret = |e: TransportError| match e {
        TransportError::Reset { code } => codes::refusal(code, request_len),
        other => other,
    };
    frame::write_frame(&mut send, request).await.map_err(interpret)?;
    // Only fails if the stream is already finished or reset; the read below reports why.
    let _ = send.finish();
    frame::read_answer_frame(&mut recv).await.map_err(interpret)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: a client whose peers are all on loopback binds loopback of their family, and any
    // other mix (or no peers) binds every interface.
    #[test]
    fn binds_loopback_for_loopback_peers() {
        let v4: IpAddr = Ipv4Addr::LOCALHOST.into();
        let v6: IpAddr = Ipv6Addr::LOCALHOST.into();
        let lan: IpAddr = Ipv4Addr::new(10, 0, 0, 7).into();
        assert_eq!(loopback_bind(&[v4, v4]), Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))));
        assert_eq!(loopback_bind(&[v6]), Some(SocketAddr::from((Ipv6Addr::LOCALHOST, 0))));
        assert_eq!(loopback_bind(&[v4, lan]), None);
        assert_eq!(loopback_bind(&[v4, v6]), None);
        assert_eq!(loopback_bind(&[]), None);
    }
}
