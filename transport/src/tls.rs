//! rustls and quinn configuration: TLS 1.3 only, the ring provider passed explicitly (no
//! process-wide default), ALPN [`crate::ALPN`], and client certificates required by servers.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::certs::{self, Role};
use crate::error::{Result, TransportError};
use crate::Identity;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub(crate) fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TransportError::Cert(format!("parse certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(TransportError::Cert("no certificate in PEM".to_owned()));
    }
    Ok(certs)
}

pub(crate) fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| TransportError::Cert(format!("parse private key PEM: {e}")))
}

fn roots(ca_pem: &str) -> Result<Arc<RootCertStore>> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(ca_pem)? {
        roots.add(cert).map_err(|e| TransportError::Cert(format!("CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

fn tls_error(e: rustls::Error) -> TransportError {
    TransportError::Cert(e.to_string())
}

/// The server's rustls config: it presents `identity` and requires a client certificate that
/// chains to the same CA.
pub(crate) fn server_crypto(identity: &Identity) -> Result<QuicServerConfig> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots(identity.ca_pem())?, provider())
            .build()
            .map_err(|e| TransportError::Cert(format!("client verifier: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(parse_certs(identity.cert_pem())?, parse_key(identity.key_pem())?)
        .map_err(tls_error)?;
    config.alpn_protocols = vec![crate::ALPN.to_vec()];
    QuicServerConfig::try_from(config).map_err(|e| TransportError::Config(e.to_string()))
}

/// What a client presents: a certificate and key, or (only tests) nothing.
pub(crate) struct ClientAuth<'a> {
    pub ca_pem: &'a str,
    pub cert_and_key: Option<(&'a str, &'a str)>,
    pub alpn: &'a [u8],
}

impl<'a> ClientAuth<'a> {
    pub fn of(identity: &'a Identity) -> Self {
        ClientAuth {
            ca_pem: identity.ca_pem(),
            cert_and_key: Some((identity.cert_pem(), identity.key_pem())),
            alpn: crate::ALPN,
        }
    }
}

/// The client's rustls config: it trusts only the cluster CA and verifies [`crate::SERVER_NAME`].
pub(crate) fn client_crypto(auth: ClientAuth<'_>) -> Result<QuicClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_root_certificates(roots(auth.ca_pem)?);
    let mut config = match auth.cert_and_key {
        Some((cert, key)) => {
            builder.with_client_auth_cert(parse_certs(cert)?, parse_key(key)?).map_err(tls_error)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![auth.alpn.to_vec()];
    QuicClientConfig::try_from(config).map_err(|e| TransportError::Config(e.to_string()))
}

/// The role in the certificate a connected peer presented. rustls has already checked that
/// the certificate chains to the cluster CA; this reads the name.
pub(crate) fn peer_role(conn: &quinn::Connection) -> Result<Role> {
    let identity = conn
        .peer_identity()
        .ok_or_else(|| TransportError::Cert("peer presented no certificate".to_owned()))?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TransportError::Cert("peer identity is not a certificate chain".to_owned()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| TransportError::Cert("peer presented an empty chain".to_owned()))?;
    certs::role_of(leaf)
}

/// The quinn transport parameters both ends use. `max_bidi_streams` is what the *peer* may
/// open towards us: a server's request concurrency per connection, zero for a client (servers
/// never open streams). Unidirectional streams are unused.
pub(crate) fn transport(
    max_bidi_streams: u32,
    idle_timeout: Duration,
    keep_alive_interval: Option<Duration>,
) -> Result<Arc<TransportConfig>> {
    let idle = IdleTimeout::try_from(idle_timeout).map_err(|_| {
        TransportError::Config(format!("idle timeout {idle_timeout:?} is too long"))
    })?;
    let mut config = TransportConfig::default();
    config
        .max_concurrent_bidi_streams(VarInt::from_u32(max_bidi_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .max_idle_timeout(Some(idle))
        .keep_alive_interval(keep_alive_interval);
    Ok(Arc::new(config))
}

/// What the server's stable keys are derived for, so the same private key yields no other key
/// of ours.
const RESET_KEY_CONTEXT: &[u8] = b"sq-cloud QUIC stateless reset key v1";
const CID_KEY_CONTEXT: &[u8] = b"sq-cloud QUIC connection id key v1";

/// A server endpoint's configuration, with the keys its stateless resets need derived from its
/// private key, so a node's process started again (same key files) answers for the connections
/// of the one before.
///
/// A peer still holding a connection to the old process sends its next packet to the new one,
/// which knows no such connection. It answers with a stateless reset if the packet's connection
/// id passes its check (ids carry a hash under the connection id key), signed with a token
/// computed from the id under the reset key. quinn draws both keys at random per process, so
/// the new process dropped the packet, and the peer waited for its call's timeout (up to 2 s
/// between nodes, 1.5 s from a gateway) before it tried a new connection. With both keys
/// stable, the reset ends the old connection at once. Anyone holding the private key can
/// already impersonate the node, so deriving from it exposes nothing new.
pub(crate) fn server_endpoint(identity: &Identity) -> quinn::EndpointConfig {
    let secret = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, identity.key_pem().as_bytes());
    let reset = ring::hmac::sign(&secret, RESET_KEY_CONTEXT);
    let cid = ring::hmac::sign(&secret, CID_KEY_CONTEXT);
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&cid.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        reset.as_ref(),
    )));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}
