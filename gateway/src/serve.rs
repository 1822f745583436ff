//! Accepting HTTP and HTTPS connections.

use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{router, Gateway, GatewayConfig, GatewayError, TlsFiles};

/// The most HTTP connections served at once; more wait in the kernel's accept queue.
const HTTP_CONNECTIONS_MAX: usize = 4096;

pub async fn serve(
    gw: Arc<Gateway>,
    config: &GatewayConfig,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let listener = TcpListener::bind(config.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, tls = config.tls.is_some(), "gateway listening");
    let app = router(gw);
    let Some(tls) = &config.tls else {
        let stop = shutdown.clone();
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await?;
        return Ok(());
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config(tls)?));
    let permits = Arc::new(tokio::sync::Semaphore::new(HTTP_CONNECTIONS_MAX));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            p = permits.clone().acquire_owned() => p.map_err(|e| GatewayError::Config(e.to_string()))?,
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            a = listener.accept() => a?,
        };
        let acceptor = acceptor.clone();
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let stream = match acceptor.accept(tcp).await {
                Ok(s) => s,
                Err(e) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
            };
            let builder = auto::Builder::new(TokioExecutor::new());
            if let Err(e) =
                builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await
            {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

pub(crate) fn tls_config(files: &TlsFiles) -> Result<rustls::ServerConfig, GatewayError> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| GatewayError::Config(format!("{}: {e}", p.display())))
    };
    let cert_pem = read(&files.cert)?;
    let key_pem = read(&files.key)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| GatewayError::Config(format!("certificate: {e}")))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| GatewayError::Config(format!("key: {e}")))?
        .ok_or_else(|| GatewayError::Config("key file holds no private key".into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| GatewayError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| GatewayError::Config(format!("certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
