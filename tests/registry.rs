//! Black-box tests of the Raft registry and the cluster transport with real `sq-cloud node`
//! processes on loopback: leader failure, full restart, membership changes under load, and
//! refusal of peers without a certificate from the cluster CA.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{admin, free_udp_port, settle, start_node, wait_for, DevCluster};
use proto::cluster::{NodeRequest, NodeResponse};
use reqwest::Method;

fn tenant_ids(c: &DevCluster) -> Vec<String> {
    let (status, list) = admin(c, Method::GET, "/admin/tenants", None);
    assert_eq!(status, 200, "{list}");
    list.as_array().unwrap().iter().map(|t| t["tenant_id"].as_str().unwrap().to_string()).collect()
}

fn raft(c: &DevCluster) -> Option<(u64, u64)> {
    let (status, h) = admin(c, Method::GET, "/admin/health", None);
    if status != 200 {
        return None;
    }
    Some((h["raft"]["leader"].as_u64()?, h["raft"]["term"].as_u64()?))
}

// Goal: a 3-node registry elects a leader and commits tenants; losing the leader gives a new
// leader in a higher term with no committed tenant lost, and SIGKILL of the old leader's process
// (restarted by the supervisor) loses nothing either; a restart of every node keeps every tenant.
// The leader is first frozen (SIGSTOP): killed outright, the supervisor restarts it within a
// second and it resumes its own term before the others time out.
#[test]
fn leader_kill_and_full_restart_keep_every_tenant() {
    let tmp = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", common::free_tcp_port());
    let mut cluster = DevCluster::start_in(tmp.path(), 3, &listen);
    let (leader, term) = wait_for(Duration::from_secs(20), "a leader", || raft(&cluster)).0;
    for i in 0..20 {
        cluster.add_tenant(&format!("r{i}"), serde_json::json!({}));
    }
    let pid = cluster.json["nodes"].as_array().unwrap().iter().find(|n| n["id"] == leader).unwrap()
        ["pid"]
        .as_i64()
        .unwrap();
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    let (new_leader, new_term) =
        wait_for(Duration::from_secs(30), "a leader in a higher term", || {
            raft(&cluster).filter(|(_, t)| *t > term)
        })
        .0;
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert_ne!(new_leader, leader);
    eprintln!("leader {leader} (term {term}) lost; node {new_leader} leads in term {new_term}; {leader} killed");
    for i in 20..25 {
        cluster.add_tenant(&format!("r{i}"), serde_json::json!({}));
    }
    let ids = tenant_ids(&cluster);
    for i in 0..25 {
        assert!(ids.contains(&format!("r{i}")), "tenant r{i} lost: {ids:?}");
    }
    cluster.stop();
    drop(cluster);
    let cluster = DevCluster::start_in(tmp.path(), 3, &listen);
    wait_for(Duration::from_secs(30), "a leader after the restart", || raft(&cluster));
    let ids = tenant_ids(&cluster);
    for i in 0..25 {
        assert!(ids.contains(&format!("r{i}")), "tenant r{i} lost across the restart: {ids:?}");
    }
}

// Goal: a node joins, and later leaves (drain, then remove), while tenants are being added;
// every acknowledged tenant is kept and the removed id can never join again.
#[test]
fn join_and_leave_while_tenants_are_added() {
    let cluster = Arc::new(DevCluster::start(3));
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let adder = {
        let (cluster, stop, acked) = (cluster.clone(), stop.clone(), acked.clone());
        std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                let id = format!("m{i}");
                let (status, _) = admin(
                    &cluster,
                    Method::POST,
                    "/admin/tenants/add",
                    Some(serde_json::json!({"tenant_id": id})),
                );
                if status == 201 {
                    acked.lock().unwrap().push(id);
                }
                i += 1;
            }
        })
    };
    let port = free_udp_port();
    let mut node4 = start_node(&cluster, 4, port);
    let (status, body) = admin(
        &cluster,
        Method::POST,
        "/admin/nodes",
        Some(serde_json::json!({"id": 4, "addr": format!("127.0.0.1:{port}")})),
    );
    assert_eq!(status, 200, "{body}");
    settle(&cluster, "join");
    let (status, body) = admin(&cluster, Method::POST, "/admin/nodes/4/drain", None);
    assert_eq!(status, 200, "{body}");
    settle(&cluster, "drain");
    let (status, body) = admin(&cluster, Method::DELETE, "/admin/nodes/4", None);
    assert_eq!(status, 200, "{body}");
    stop.store(true, Ordering::SeqCst);
    adder.join().unwrap();
    let _ = node4.kill();
    let _ = node4.wait();

    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 5, "only {} tenants were added during the changes", acked.len());
    let ids = tenant_ids(&cluster);
    for id in &acked {
        assert!(ids.contains(id), "acknowledged tenant {id} lost");
    }
    let (_, health) = admin(&cluster, Method::GET, "/admin/health", None);
    assert_eq!(health["ring"], serde_json::json!([1, 2, 3]), "{health}");
    let (status, _) = admin(
        &cluster,
        Method::POST,
        "/admin/nodes",
        Some(serde_json::json!({"id": 4, "addr": format!("127.0.0.1:{port}")})),
    );
    assert_eq!(status, 409, "a removed node id was accepted again");
    eprintln!("{} tenants added while node 4 joined and left", acked.len());
}

fn view_request() -> bytes::Bytes {
    proto::wire::encode(&NodeRequest::View { known_index: 0, wait_ms: 0 }).unwrap().into()
}

/// A QUIC client that trusts the cluster CA but presents no certificate of its own.
async fn anonymous_call(ca_pem: &[u8], addr: SocketAddr) -> Result<Vec<u8>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &ca_pem[..]) {
        roots.add(cert.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![transport::ALPN.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).map_err(|e| e.to_string())?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint
        .connect(addr, transport::SERVER_NAME)
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    // The handshake can look complete here before the server has checked (and refused) us:
    // only a request shows whether we are in.
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let request = view_request();
    let mut framed = transport::frame::header(request.len()).map_err(|e| e.to_string())?.to_vec();
    framed.extend_from_slice(&request);
    send.write_all(&framed).await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    recv.read_to_end(1 << 20).await.map_err(|e| e.to_string())
}

// Goal: a QUIC peer with no certificate, or with one from another CA, gets no answer from a real
// node; a peer with the cluster's own certificate does (so the refusals are not an accident).
#[test]
fn nodes_refuse_peers_without_a_cluster_certificate() {
    let cluster = DevCluster::start(1);
    let addr: SocketAddr = cluster.json["nodes"][0]["addr"].as_str().unwrap().parse().unwrap();
    let certs = cluster.dir.join("certs");
    let other = tempfile::tempdir().unwrap();
    transport::certs::create_ca(other.path()).unwrap();
    transport::certs::issue(other.path(), transport::Role::Gateway).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let timeout = Duration::from_secs(5);
        let ours = transport::Client::new(
            &transport::Identity::load(&certs, transport::Role::Gateway).unwrap(),
            Default::default(),
        )
        .unwrap();
        let answer = ours
            .call(addr, view_request(), timeout)
            .await
            .expect("the cluster's own gateway certificate is accepted");
        assert!(matches!(proto::wire::decode(&answer), Ok(NodeResponse::View(Some(_)))));

        let stranger = transport::Client::new(
            &transport::Identity::load(other.path(), transport::Role::Gateway).unwrap(),
            Default::default(),
        )
        .unwrap();
        let refused = stranger.call(addr, view_request(), timeout).await;
        assert!(refused.is_err(), "a certificate from another CA was answered");

        let ca = std::fs::read(certs.join("ca.pem")).unwrap();
        let anonymous = tokio::time::timeout(timeout, anonymous_call(&ca, addr)).await;
        assert!(
            !matches!(anonymous, Ok(Ok(_))),
            "a peer without a certificate was answered: {anonymous:?}"
        );
    });
}
