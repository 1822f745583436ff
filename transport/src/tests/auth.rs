use std::fs;

use super::*;

/// A call that must be refused: the handshake may appear to succeed on the client (TLS 1.3
/// lets a client finish before the server has checked its certificate), so the test always
/// sends a request and expects the call itself to fail.
async fn expect_refused(client: &Client, addr: SocketAddr) -> TransportError {
    let err = client.call(addr, Bytes::from_static(b"let me in"), CALL_TIMEOUT).await;
    let err = err.expect_err("call must be refused");
    assert!(!err.is_unavailable(), "a refusal is not an outage: {err:?}");
    err
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).expect("read PEM")
}

#[tokio::test]
async fn client_without_certificate_is_refused() {
    // Goal: a peer that trusts our CA but presents no certificate gets no answer.
    bounded(async {
        let cluster = Cluster::new();
        let server = cluster.start(Arc::new(Echo));
        let ca = read(&cluster.path().join(certs::CA_CERT_FILE));
        let anonymous = raw_client(&ca, None, crate::ALPN);
        let err = expect_refused(&anonymous, server.addr).await;
        assert!(matches!(err, TransportError::Tls { .. }), "{err:?}");
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn client_with_certificate_from_another_ca_is_refused() {
    // Goal: a certificate signed by some other CA does not get a peer in, even when the peer
    // trusts our CA and uses a valid role name.
    bounded(async {
        let cluster = Cluster::new();
        let other = Cluster::new();
        let server = cluster.start(Arc::new(Echo));
        let ca = read(&cluster.path().join(certs::CA_CERT_FILE));
        let cert = read(&certs::cert_path(other.path(), Role::Gateway));
        let key = read(&certs::key_path(other.path(), Role::Gateway));
        let stranger = raw_client(&ca, Some((&cert, &key)), crate::ALPN);
        let err = expect_refused(&stranger, server.addr).await;
        assert!(matches!(err, TransportError::Tls { .. }), "{err:?}");
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn server_with_certificate_from_another_ca_is_refused() {
    // Goal: a client does not talk to a server whose certificate comes from another CA.
    bounded(async {
        let cluster = Cluster::new();
        let other = Cluster::new();
        let impostor = other.start(Arc::new(Echo));
        let err = expect_refused(&cluster.client(), impostor.addr).await;
        assert!(matches!(err, TransportError::Tls { .. }), "{err:?}");
        impostor.stop().await;
    })
    .await;
}

#[tokio::test]
async fn certificate_naming_no_role_is_refused() {
    // Goal: a certificate from our own CA whose common name is not a role is refused after
    // the handshake, with a reason the client can tell apart from a TLS failure.
    bounded(async {
        let cluster = Cluster::new();
        let server = cluster.start(Arc::new(Echo));
        let (cert_file, key_file) =
            (cluster.path().join("intruder.pem"), cluster.path().join("intruder.key"));
        certs::issue_named(cluster.path(), "sq-intruder", &cert_file, &key_file).expect("issue");
        let ca = read(&cluster.path().join(certs::CA_CERT_FILE));
        let (cert, key) = (read(&cert_file), read(&key_file));
        let intruder = raw_client(&ca, Some((&cert, &key)), crate::ALPN);
        let err = expect_refused(&intruder, server.addr).await;
        assert!(matches!(err, TransportError::Refused { .. }), "{err:?}");
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn peer_speaking_another_alpn_fails_at_connect() {
    // Goal: a peer built for another protocol version (another ALPN) fails in the handshake,
    // before any frame is exchanged.
    bounded(async {
        let cluster = Cluster::new();
        let server = cluster.start(Arc::new(Echo));
        let ca = read(&cluster.path().join(certs::CA_CERT_FILE));
        let cert = read(&certs::cert_path(cluster.path(), Role::Gateway));
        let key = read(&certs::key_path(cluster.path(), Role::Gateway));
        let old = raw_client(&ca, Some((&cert, &key)), b"sq-cloud/0");
        let err = expect_refused(&old, server.addr).await;
        assert!(matches!(err, TransportError::Tls { .. }), "{err:?}");
        assert_eq!(old.stats().connections_opened, 0, "the handshake itself must fail");
        server.stop().await;
    })
    .await;
}

#[tokio::test]
async fn public_https_certificate_cannot_join_the_cluster() {
    // Goal: the gateway's HTTPS certificate, though signed by the cluster CA, is refused as a
    // cluster client; and issuing it again keeps the existing pair.
    bounded(async {
        let cluster = Cluster::new();
        certs::issue_https(cluster.path(), "https").expect("issue https");
        let cert_file = cluster.path().join("https.pem");
        let before = read(&cert_file);
        certs::issue_https(cluster.path(), "https").expect("issue https again");
        assert_eq!(read(&cert_file), before, "an existing pair is kept");
        assert!(certs::issue_https(cluster.path(), "../escape").is_err());

        let server = cluster.start(Arc::new(Echo));
        let ca = read(&cluster.path().join(certs::CA_CERT_FILE));
        let key = read(&cluster.path().join("https.key"));
        let web = raw_client(&ca, Some((&before, &key)), crate::ALPN);
        let err = expect_refused(&web, server.addr).await;
        assert!(matches!(err, TransportError::Tls { .. }), "{err:?}");
        server.stop().await;
    })
    .await;
}
