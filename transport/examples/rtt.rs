//! What one call costs on loopback: a 100-byte request echoed back, one call at a time, through
//! the real `Server` and pooled `Client` (mutual TLS, one stream per call).
//!
//! Run: `cargo run --release -p transport --example rtt -- [calls] [worker-threads] [split]`
//! - worker threads: of each tokio runtime; 0 means one current-thread runtime;
//! - `split`: the server runs in a second process, as a node does for a gateway; without it,
//!   server and client share one runtime, so the figure is the transport's own cost without a
//!   second process's wake-up;
//! - `udp`: no QUIC at all: a 100-byte UDP datagram echoed by a second process over blocking
//!   sockets. The machine's floor for any request that crosses two processes.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use transport::{
    certs, Client, ClientLimits, Handler, HandlerFuture, Identity, Peer, Role, Server, ServerLimits,
};

struct Echo;

impl Handler for Echo {
    fn handle(&self, _peer: Peer, request: Bytes) -> HandlerFuture<'_> {
        Box::pin(async move { request })
    }
}

fn runtime(threads: usize) -> tokio::runtime::Runtime {
    let runtime = match threads {
        0 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build(),
    };
    runtime.expect("runtime")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--udp-echo") {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        println!("{}", socket.local_addr().expect("address"));
        std::io::stdout().flush().expect("stdout");
        let mut buf = [0u8; 2048];
        loop {
            let (n, from) = socket.recv_from(&mut buf).expect("receive");
            if n == 0 {
                return;
            }
            socket.send_to(&buf[..n], from).expect("send");
        }
    }
    if args.first().map(String::as_str) == Some("--serve") {
        // The second process of a split run: serve until stdin closes.
        let (dir, threads) = (Path::new(&args[1]), args[2].parse().expect("threads"));
        return runtime(threads).block_on(async move {
            let (addr, shutdown) = serve(dir);
            println!("{addr}");
            std::io::stdout().flush().expect("stdout");
            tokio::task::spawn_blocking(|| std::io::stdin().read_line(&mut String::new()))
                .await
                .ok();
            shutdown.cancel();
        });
    }
    let calls: usize = args.first().map_or(20_000, |a| a.parse().expect("calls: a number"));
    let threads: usize = args.get(1).map_or(2, |a| a.parse().expect("worker threads: a number"));
    let split = args.get(2).is_some_and(|a| a == "split");
    if args.get(2).is_some_and(|a| a == "udp") {
        return udp_floor(calls);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    certs::create_ca(dir.path()).expect("CA");
    for role in [Role::Node(1), Role::Gateway] {
        certs::issue(dir.path(), role).expect("certificate");
    }
    // On a worker, as a node's and a gateway's request tasks are.
    runtime(threads).block_on(async move {
        tokio::spawn(async move {
            if split {
                let mut child = Command::new(std::env::current_exe().expect("this example"))
                    .args(["--serve", &dir.path().display().to_string(), &threads.to_string()])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("server process");
                let mut line = String::new();
                BufReader::new(child.stdout.take().expect("stdout"))
                    .read_line(&mut line)
                    .expect("address");
                calls_to(line.trim().parse().expect("address"), dir.path(), calls).await;
                drop(child.stdin.take());
                child.wait().expect("server process ends");
            } else {
                let (addr, shutdown) = serve(dir.path());
                calls_to(addr, dir.path(), calls).await;
                shutdown.cancel();
            }
        })
        .await
        .expect("run")
    });
}

/// Blocking UDP ping-pong with a second process: what two wake-ups across processes cost here.
fn udp_floor(calls: usize) {
    let mut child = Command::new(std::env::current_exe().expect("this example"))
        .arg("--udp-echo")
        .stdout(Stdio::piped())
        .spawn()
        .expect("echo process");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("address");
    let echo: SocketAddr = line.trim().parse().expect("address");
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let (payload, mut buf) = ([b'x'; 100], [0u8; 2048]);
    let mut took = Vec::with_capacity(calls);
    for i in 0..calls + 1_000 {
        let started = Instant::now();
        socket.send_to(&payload, echo).expect("send");
        socket.recv_from(&mut buf).expect("receive");
        if i >= 1_000 {
            took.push(started.elapsed());
        }
    }
    socket.send_to(&[], echo).expect("stop the echo process");
    child.wait().expect("echo process ends");
    report(calls, "UDP datagrams", took);
}

fn report(calls: usize, what: &str, mut took: Vec<Duration>) {
    took.sort();
    let at = |q: f64| took[((took.len() - 1) as f64 * q) as usize].as_micros();
    println!(
        "{calls} {what}, one at a time: p50 {} µs, p90 {} µs, p99 {} µs",
        at(0.5),
        at(0.9),
        at(0.99)
    );
}

fn serve(dir: &Path) -> (SocketAddr, CancellationToken) {
    let identity = Identity::load(dir, Role::Node(1)).expect("identity");
    let server =
        Server::bind(SocketAddr::from(([127, 0, 0, 1], 0)), &identity, ServerLimits::default())
            .expect("bind");
    let addr = server.local_addr().expect("address");
    let shutdown = CancellationToken::new();
    tokio::spawn(server.run(Arc::new(Echo), shutdown.clone()));
    (addr, shutdown)
}

async fn calls_to(addr: SocketAddr, dir: &Path, calls: usize) {
    let identity = Identity::load(dir, Role::Gateway).expect("identity");
    let client = Client::new(&identity, ClientLimits::default()).expect("client");
    let payload = Bytes::from(vec![b'x'; 100]);
    let timeout = Duration::from_secs(5);
    for _ in 0..1_000 {
        client.call(addr, payload.clone(), timeout).await.expect("warm-up call");
    }
    let mut took = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        client.call(addr, payload.clone(), timeout).await.expect("call");
        took.push(started.elapsed());
    }
    report(calls, "calls", took);
}
