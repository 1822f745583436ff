//! Accepting HTTP and HTTPS connections, within a cap per client address and a global cap.
//!
//! Plain HTTP and TLS go through the same loop and the same per-connection code
//! ([`crate::conn`]), so both get every timeout and cap. A connection over its address's cap is
//! closed as soon as it is accepted: one address can hold at most
//! [`HttpLimits::connections_per_address`] of the gateway's slots, so idle or trickling
//! connections from it never lock out another address. IPv6 clients are counted by /64, the
//! block one subscriber gets.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::conn::{self, Listener, Timeouts};
use crate::head::CloseRule;
use crate::lograte::Tally;
use crate::{router, Gateway, GatewayConfig, GatewayError, HttpLimits, TlsFiles};

/// Pause after a failed accept (out of file descriptors, most often) before trying again, so a
/// full table is not spun on while connections close.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// How long answers in progress get to finish when the gateway stops.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(5);

static ACCEPT_ERRORS: Tally = Tally::new();
static OVER_ADDRESS_CAP: Tally = Tally::new();

pub async fn serve(
    gw: Arc<Gateway>,
    config: &GatewayConfig,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let listener = TcpListener::bind(config.listen).await?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, tls = config.tls.is_some(), "gateway listening");
    let tls = match &config.tls {
        Some(files) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(tls_config(files)?))),
        None => None,
    };
    let shared = Listener {
        app: router(gw),
        close: CloseRule { local_port: local.port(), plain: tls.is_none() },
        tls,
        timeouts: Timeouts::from(&config.http),
    };
    let limits: &HttpLimits = &config.http;
    let permits = Arc::new(tokio::sync::Semaphore::new(limits.connections_max));
    let per_address = Arc::new(AddressCounts::default());
    // Each connection task holds a sender; the receiver ends once all of them have finished.
    let (running, mut finished) = tokio::sync::mpsc::channel::<()>(1);
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = permits.clone().acquire_owned() => p.map_err(|e| GatewayError::Config(e.to_string()))?,
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    if let Some(n) = ACCEPT_ERRORS.note() {
                        tracing::warn!(count = n, error = %e, "accepting connections failed");
                    }
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        let Some(slot) = per_address.take(peer.ip(), limits.connections_per_address) else {
            conn::closed("address_cap");
            if let Some(n) = OVER_ADDRESS_CAP.note() {
                tracing::warn!(count = n, %peer, "connections closed: over the cap per address");
            }
            continue;
        };
        let (shared, stop, running) = (shared.clone(), shutdown.clone(), running.clone());
        tokio::spawn(async move {
            conn::serve(shared, tcp, peer, stop).await;
            drop((slot, permit, running));
        });
    }
    drop(running);
    if tokio::time::timeout(SHUTDOWN_DRAIN, finished.recv()).await.is_err() {
        tracing::info!("stopping with client connections still open");
    }
    Ok(())
}

/// Open connections by client address (an IPv6 address by its /64).
#[derive(Default)]
struct AddressCounts(Mutex<HashMap<IpAddr, usize>>);

/// One connection counted against its address until dropped.
struct AddressSlot {
    counts: Arc<AddressCounts>,
    key: IpAddr,
}

impl AddressCounts {
    fn key(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
            },
            v4 => v4,
        }
    }

    /// A slot for `ip`, or `None` when its address already holds `cap` connections.
    fn take(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<AddressSlot> {
        let key = Self::key(ip);
        let mut counts = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let n = counts.entry(key).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(AddressSlot { counts: self.clone(), key })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = counts.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: an address gets at most `cap` slots, a slot returns when dropped, other addresses
    // are unaffected, and IPv6 addresses of one /64 share a count.
    #[test]
    fn address_cap() {
        let counts = Arc::new(AddressCounts::default());
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.1".parse().unwrap();
        let held: Vec<_> = (0..3).map(|_| counts.take(a, 3).expect("under the cap")).collect();
        assert!(counts.take(a, 3).is_none());
        assert!(counts.take(b, 3).is_some());
        drop(held);
        assert!(counts.take(a, 3).is_some());
        assert!(counts.0.lock().unwrap().len() <= 1, "empty counts are removed");
        let v6a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let v6c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        let _one = counts.take(v6a, 1).unwrap();
        assert!(counts.take(v6b, 1).is_none(), "same /64");
        assert!(counts.take(v6c, 1).is_some(), "another /64");
        let mapped: IpAddr = "::ffff:127.0.0.2".parse().unwrap();
        let _two = [counts.take(a, 2).unwrap(), counts.take(a, 2).unwrap()];
        assert!(counts.take(mapped, 2).is_none(), "a mapped IPv4 address counts as itself");
    }
}
