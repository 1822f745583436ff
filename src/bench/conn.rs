//! One keep-alive HTTP/1.1 connection per bench worker, driven by hyper on the worker's own
//! current-thread runtime: no pool, no hand-off between threads, so the time measured is the
//! request's round trip and little else (as wrk measures it).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// How long one request may take before the worker counts it as failed and reconnects.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long connecting (TCP plus TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where and how to connect: the same for every worker.
#[derive(Clone)]
pub struct Endpoint {
    /// `host:port`, also sent as the `Host` header.
    pub authority: String,
    /// TLS settings and the server name to check, for `https://`.
    pub tls: Option<(Arc<rustls::ClientConfig>, rustls::pki_types::ServerName<'static>)>,
}

impl Endpoint {
    /// From `http(s)://host:port`; HTTPS trusts only the CA certificates in `ca_pem`.
    pub fn new(url: &str, ca_pem: Option<&[u8]>) -> anyhow::Result<Endpoint> {
        let (https, authority) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
            (Some(a), _) => (false, a),
            (_, Some(a)) => (true, a),
            _ => bail!("{url:?} is not an http:// or https:// URL"),
        };
        let authority = authority.split('/').next().unwrap_or(authority).to_string();
        if !https {
            return Ok(Endpoint { authority, tls: None });
        }
        let Some(pem) = ca_pem else {
            bail!("{url} is HTTPS: give the CA to trust with --ca FILE or SQ_CLOUD_CA (with --dev, the cluster's own CA is used)");
        };
        let host = authority
            .rsplit_once(':')
            .map_or(authority.as_str(), |(h, _)| h)
            .trim_matches(['[', ']']);
        let name = rustls::pki_types::ServerName::try_from(host.to_string())
            .with_context(|| format!("{host:?} is not a server name"))?;
        Ok(Endpoint { authority, tls: Some((Arc::new(tls_config(pem)?), name)) })
    }
}

fn tls_config(ca_pem: &[u8]) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &ca_pem[..]) {
        roots
            .add(cert.context("reading the CA certificate")?)
            .context("adding the CA certificate")?;
    }
    if roots.is_empty() {
        bail!("the CA file holds no certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// What one request came back with.
pub struct Answer {
    pub status: u16,
    pub body: Bytes,
}

/// One open connection. Must be used inside a tokio runtime (the worker's own).
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    authority: String,
}

impl Conn {
    pub async fn open(endpoint: &Endpoint) -> anyhow::Result<Conn> {
        tokio::time::timeout(CONNECT_TIMEOUT, Conn::open_unbounded(endpoint)).await.with_context(
            || format!("connecting to {} took over {CONNECT_TIMEOUT:?}", endpoint.authority),
        )?
    }

    async fn open_unbounded(endpoint: &Endpoint) -> anyhow::Result<Conn> {
        let tcp = tokio::net::TcpStream::connect(&endpoint.authority)
            .await
            .with_context(|| format!("connecting to {}", endpoint.authority))?;
        tcp.set_nodelay(true)?;
        let sender = match &endpoint.tls {
            None => handshake(tcp).await?,
            Some((config, name)) => {
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .context("TLS handshake")?;
                handshake(tls).await?
            }
        };
        Ok(Conn { sender, authority: endpoint.authority.clone() })
    }

    /// Sends one request and reads the whole answer, within [`REQUEST_TIMEOUT`].
    pub async fn send(
        &mut self,
        method: hyper::Method,
        path_and_query: &str,
        auth: &str,
        body: Bytes,
    ) -> anyhow::Result<Answer> {
        tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.send_unbounded(method, path_and_query, auth, body),
        )
        .await
        .with_context(|| format!("no answer within {REQUEST_TIMEOUT:?}"))?
    }

    async fn send_unbounded(
        &mut self,
        method: hyper::Method,
        path_and_query: &str,
        auth: &str,
        body: Bytes,
    ) -> anyhow::Result<Answer> {
        self.sender.ready().await.context("connection closed")?;
        let request = hyper::Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(hyper::header::HOST, &self.authority)
            .header(hyper::header::AUTHORIZATION, auth)
            .body(Full::new(body))?;
        let response = self.sender.send_request(request).await.context("sending the request")?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.context("reading the answer")?.to_bytes();
        Ok(Answer { status, body })
    }
}

async fn handshake<T>(io: T) -> anyhow::Result<SendRequest<Full<Bytes>>>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(io)).await.context("HTTP handshake")?;
    // The connection task ends when the sender is dropped or the peer closes; errors then
    // surface on the next send, which reconnects.
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}
