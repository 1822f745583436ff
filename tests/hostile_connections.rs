//! Hostile and careless clients against the real binary's connection layer, over plain HTTP and
//! TLS: a flood of idle and trickling connections from one address must not deny service to
//! another, trickled heads are cut by the header-read timeout, trickled bodies by the body-read
//! timeout, and request lines SQ clients send raw are served as SQ serves them, on a connection
//! closed after the answer.
//!
//! Loopback connections all come from 127.0.0.1 unless bound otherwise, so the flood binds its
//! sockets to 127.0.0.2 (all of 127.0.0.0/8 is loopback on Linux) and the normal client uses
//! 127.0.0.1: the cap per address falls on the flood only.

mod common;
mod ops_common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{free_tcp_port, DevCluster};

/// The address the flood comes from.
const FLOOD_SRC: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// The gateway's default cap per address (gateway::CONNECTIONS_PER_ADDRESS).
const CAP: usize = gateway::CONNECTIONS_PER_ADDRESS;
/// Connections that send part of a head, then a byte at a time.
const TRICKLE: usize = 100;
/// Connections that send nothing; with the trickling ones, 144 more than the cap.
const IDLE: usize = 300;
/// How often each trickling connection sends its next byte.
const TRICKLE_PERIOD: Duration = Duration::from_millis(200);
/// A bound no healthy run comes near (measured latencies are printed), and well under the
/// 10 s timeouts, so only the cap can explain a connection closed before it.
const PROMPT: Duration = Duration::from_secs(5);

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// The trickling connections; `None` once the server has closed one.
type Trickle = Arc<Mutex<Vec<Option<Box<dyn Stream>>>>>;

/// A TCP connection from `src` to `dst`: bound before connecting, which std cannot do.
fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> TcpStream {
    let SocketAddr::V4(dst) = dst else { panic!("IPv4 listener expected") };
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a fresh socket, owned by the TcpStream made from it; the addresses live across
    // the calls that read them.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let stream = TcpStream::from_raw_fd(fd);
        let local = sockaddr(src, 0);
        let bound = libc::bind(fd, &local as *const _ as *const libc::sockaddr, len);
        assert_eq!(bound, 0, "bind {src}: {}", std::io::Error::last_os_error());
        let remote = sockaddr(*dst.ip(), dst.port());
        let connected = libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len);
        assert_eq!(connected, 0, "connect {dst}: {}", std::io::Error::last_os_error());
        stream
    }
}

/// TLS clients trusting the dev cluster's CA.
fn tls_config(cluster: &DevCluster) -> Arc<rustls::ClientConfig> {
    let pem = std::fs::read(cluster.dir.join("certs/ca.pem")).expect("the dev CA");
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.expect("CA PEM")).expect("CA certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// A connection from `src`, through TLS when `tls` is set (handshake done).
fn open(
    tls: Option<&Arc<rustls::ClientConfig>>,
    src: Ipv4Addr,
    dst: SocketAddr,
) -> Box<dyn Stream> {
    let tcp = connect_from(src, dst);
    tcp.set_read_timeout(Some(PROMPT)).unwrap();
    let Some(config) = tls else { return Box::new(tcp) };
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = rustls::ClientConnection::new(config.clone(), name).expect("TLS client");
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock).expect("TLS handshake");
    }
    Box::new(stream)
}

/// Sends `request` and reads the answer to the end of the stream: what SQ's own clients do.
/// Returns the answer, or `None` if the server did not close within [`PROMPT`].
fn exchange_to_eof(stream: &mut dyn Stream, request: &[u8]) -> Option<String> {
    stream.write_all(request).expect("send");
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Ok(_) => Some(String::from_utf8_lossy(&answer).into_owned()),
        // A TLS peer that closes without close_notify ends the stream the same way.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Some(String::from_utf8_lossy(&answer).into_owned())
        }
        Err(_) => None,
    }
}

/// Whether the server has closed `tcp` (a read sees the end of the stream or a reset).
fn closed_by_server(tcp: &TcpStream) -> bool {
    tcp.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    let closed = match (&*tcp).read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    tcp.set_nonblocking(false).unwrap();
    closed
}

fn body(answer: &str) -> &str {
    answer.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

fn flood_then_serve(tls: bool) {
    let listen = format!("127.0.0.1:{}", free_tcp_port());
    let dir = tempfile::tempdir().unwrap();
    let extra: &[&str] = if tls { &["--tls"] } else { &[] };
    let cluster = DevCluster::start_with(dir.path(), 1, &listen, extra);
    let dst: SocketAddr = listen.parse().unwrap();
    let key = cluster.demo_key();
    let config = tls.then(|| tls_config(&cluster));
    let mode = if tls { "tls" } else { "plain" };

    // Trickling connections first (all within the cap), then idle ones past it.
    let trickle: Trickle = Arc::new(Mutex::new(
        (0..TRICKLE)
            .map(|_| {
                let mut s = open(config.as_ref(), FLOOD_SRC, dst);
                s.write_all(b"GET /api/v2/select?p=flood&c=1.1.1/1.1.1/1.1.1").unwrap();
                s.flush().unwrap();
                Some(s)
            })
            .collect(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let trickler = {
        let (trickle, stop) = (trickle.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for slot in trickle.lock().unwrap().iter_mut() {
                    let failed = slot
                        .as_mut()
                        .is_some_and(|s| s.write_all(b"1").and_then(|_| s.flush()).is_err());
                    if failed {
                        *slot = None;
                    }
                }
                std::thread::sleep(TRICKLE_PERIOD);
            }
        })
    };
    let idle: Vec<TcpStream> = (0..IDLE).map(|_| connect_from(FLOOD_SRC, dst)).collect();
    let opened = Instant::now();

    // The cap: every connection past it is closed at once, long before any timeout.
    let over = TRICKLE + IDLE - CAP;
    let mut closed = 0;
    while opened.elapsed() < PROMPT {
        closed = idle.iter().filter(|s| closed_by_server(s)).count();
        if closed >= over {
            break;
        }
    }
    assert!(closed >= over, "{mode}: {closed} of {over} connections over the cap closed");

    // A normal request on a fresh connection from another address.
    let request = format!(
        "GET /api/v2/update?p=edge&c=1.1.1/1.1.1/1.1.1&s=fresh HTTP/1.1\r\nHost: {listen}\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    );
    let started = Instant::now();
    let mut fresh = open(config.as_ref(), Ipv4Addr::LOCALHOST, dst);
    let answer = exchange_to_eof(fresh.as_mut(), request.as_bytes());
    let latency = started.elapsed();
    let held = TRICKLE + IDLE - idle.iter().filter(|s| closed_by_server(s)).count();
    eprintln!("{mode}: flood holds {held} connections; a fresh request took {latency:?}");
    let answer = answer.unwrap_or_else(|| panic!("{mode}: no answer within {PROMPT:?}"));
    assert!(answer.starts_with("HTTP/1.1 200"), "{mode}: {answer}");
    assert!(latency < PROMPT, "{mode}: {latency:?}");

    // The header-read timeout cuts trickled heads although bytes keep arriving.
    let cut = Instant::now();
    let timeout = Duration::from_millis(gateway::HEADER_READ_TIMEOUT_MS);
    while trickle.lock().unwrap().iter().any(Option::is_some) {
        assert!(cut.elapsed() < 3 * timeout, "{mode}: trickled heads still open");
        std::thread::sleep(TRICKLE_PERIOD);
    }
    eprintln!("{mode}: every trickled head cut {:?} after the fresh request", cut.elapsed());
    stop.store(true, Ordering::Relaxed);
    trickler.join().unwrap();

    raw_request_lines(config.as_ref(), dst, &listen, &key, mode);
}

/// Request lines with bytes HTTP forbids in a target, as SQ clients send them raw: each is
/// stored as sent, each answer has a body and CORS, and the connection is closed after it (the
/// client reads to the end of the stream, as SQ's own clients do).
fn raw_request_lines(
    config: Option<&Arc<rustls::ClientConfig>>,
    dst: SocketAddr,
    listen: &str,
    key: &str,
    mode: &str,
) {
    for text in ["say\"hi\"", "{\"k\":\"v\"}", "<b>", "a#b", "a\tb", "two words"] {
        let c = "2.1.1/1.1.1/1.1.1";
        let head = |route: &str, s: &str, more: &str| {
            format!("GET /api/v2/{route}?p=raw&c={c}{s} HTTP/1.1\r\nHost: {listen}\r\nAuthorization: {key}\r\n{more}\r\n")
        };
        let mut stream = open(config, Ipv4Addr::LOCALHOST, dst);
        let stored =
            exchange_to_eof(stream.as_mut(), head("update", &format!("&s={text}"), "").as_bytes())
                .unwrap_or_else(|| panic!("{mode} {text:?}: not closed after the answer"));
        assert!(stored.starts_with("HTTP/1.1 200"), "{mode} {text:?}: {stored}");
        assert!(stored.to_ascii_lowercase().contains("access-control-allow-origin: *"), "{stored}");
        let mut stream = open(config, Ipv4Addr::LOCALHOST, dst);
        let read = exchange_to_eof(
            stream.as_mut(),
            head("select", "", "Connection: close\r\n").as_bytes(),
        )
        .unwrap_or_else(|| panic!("{mode}: Connection: close not honoured"));
        assert_eq!(body(&read), text, "{mode}: {read}");
    }
}

// Goal: over plain HTTP, idle and trickling connections from one address hold at most the cap,
// a fresh request from another address is served at once, trickled heads are cut by the
// header-read timeout, and raw request lines are served as SQ serves them.
#[test]
fn plain_http_flood_and_raw_lines() {
    flood_then_serve(false);
}

// Goal: the same over TLS: idle TCP connections without a handshake and trickling heads inside
// TLS from one address never deny a fresh client from another.
#[test]
fn tls_flood_and_raw_lines() {
    flood_then_serve(true);
}

/// The body-read timeout of the gateway the trickled-body test starts: short, so the test is.
const BODY_READ_TIMEOUT: Duration = Duration::from_millis(1500);

// Goal: a body that trickles in is cut by the body-read timeout (set in gateway.toml): its
// request is answered 408 about that long after its head, the connection is closed, nothing is
// written, and the tenant is served at once after; a body that arrives in time is written.
#[test]
fn trickled_body_is_cut_by_the_body_read_timeout() {
    let cluster = DevCluster::start(1);
    let key = cluster.demo_key();
    let more = format!("\n[http]\nbody_read_timeout_ms = {}\n", BODY_READ_TIMEOUT.as_millis());
    let gateway = ops_common::SecondGateway::start_with(&cluster, &key, &more);
    let dst: SocketAddr =
        gateway.url.trim_start_matches("http://").trim_end_matches("/api/v2").parse().unwrap();
    let head = |len: usize| {
        format!(
            "POST /api/v2/update?p=slow&c=1.1.1/1.1.1/1.1.1 HTTP/1.1\r\nHost: {dst}\r\nAuthorization: Bearer {key}\r\nContent-Length: {len}\r\n\r\n"
        )
    };

    let mut tcp = connect_from(Ipv4Addr::LOCALHOST, dst);
    tcp.set_read_timeout(Some(PROMPT)).unwrap();
    tcp.write_all(head(100).as_bytes()).unwrap();
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let trickler = {
        let (mut tcp, stop) = (tcp.try_clone().unwrap(), stop.clone());
        std::thread::spawn(move || {
            // Fewer bytes than announced, so only the timeout can end the body.
            for _ in 0..50 {
                if stop.load(Ordering::Relaxed) || tcp.write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(TRICKLE_PERIOD);
            }
        })
    };
    let mut answer = Vec::new();
    let ended = tcp.read_to_end(&mut answer);
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    trickler.join().unwrap();
    let answer = String::from_utf8_lossy(&answer);
    eprintln!("a trickled body was answered after {took:?}: {answer:?}");
    assert!(ended.is_ok(), "the connection was not closed within {PROMPT:?}");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(body(&answer).contains("did not arrive within 1500 ms"), "{answer}");
    assert!(took >= BODY_READ_TIMEOUT && took < PROMPT, "{took:?}");

    let select = format!("{}/select?p=slow&c=1.1.1/1.1.1/1.1.1", gateway.url);
    let r = common::http().get(&select).bearer_auth(&key).send().unwrap();
    assert_eq!((r.status().as_u16(), r.text().unwrap()), (200, String::new()), "nothing written");

    let mut tcp = connect_from(Ipv4Addr::LOCALHOST, dst);
    tcp.set_read_timeout(Some(PROMPT)).unwrap();
    let request = head(5).replace("HTTP/1.1\r\n", "HTTP/1.1\r\nConnection: close\r\n") + "whole";
    let answer = exchange_to_eof(&mut tcp, request.as_bytes()).expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let r = common::http().get(&select).bearer_auth(&key).send().unwrap();
    assert_eq!(r.text().unwrap(), "whole");
}
