//! A raw HTTP/1.x client: requests go out byte for byte as the case file writes them (no client
//! library that would re-encode the target or add headers), answers are read as SQ writes them.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// How long one request may take, from connect to the last byte of the answer.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// One request of a client flow, as the case files hold it.
#[derive(Debug, Clone, Deserialize)]
pub struct Case {
    pub name: String,
    pub method: String,
    /// The request target; `target_hex` instead when it holds bytes that are not UTF-8.
    #[serde(default)]
    pub target: String,
    #[serde(default)]
    pub target_hex: Option<String>,
    /// Header lines; `{KEY}` is replaced by the server's key.
    pub headers: Vec<String>,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub body_hex: Option<String>,
    #[serde(default)]
    pub opts: Opts,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Opts {
    /// The HTTP version of the request line (default HTTP/1.1).
    pub version: Option<String>,
    /// Send no `Host` header of our own.
    #[serde(default)]
    pub no_host: bool,
    /// Send no `Content-Length` for the body.
    #[serde(default)]
    pub no_cl: bool,
    /// Send `Connection: close`.
    #[serde(default)]
    pub close: bool,
}

/// An answer: status, headers (names lowercased) and body; `None` status when none came.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Answer {
    pub status: Option<u16>,
    pub headers: Vec<(String, String)>,
    /// The body as text when it is UTF-8; otherwise in `body_hex`.
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub body_hex: Option<String>,
}

impl Answer {
    fn new(status: Option<u16>, headers: Vec<(String, String)>, body: Vec<u8>) -> Answer {
        match String::from_utf8(body) {
            Ok(text) => Answer { status, headers, body: Some(text), body_hex: None },
            Err(e) => Answer { status, headers, body: None, body_hex: Some(hex(e.as_bytes())) },
        }
    }

    pub fn body_bytes(&self) -> Vec<u8> {
        match (&self.body, &self.body_hex) {
            (Some(text), _) => text.as_bytes().to_vec(),
            (None, Some(h)) => unhex(h),
            (None, None) => Vec::new(),
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unhex(text: &str) -> Vec<u8> {
    (0..text.len() / 2)
        .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("hex in a case file"))
        .collect()
}

impl Case {
    pub fn body_bytes(&self) -> Option<Vec<u8>> {
        match (&self.body, &self.body_hex) {
            (Some(text), _) => Some(text.as_bytes().to_vec()),
            (None, Some(h)) => Some(unhex(h)),
            (None, None) => None,
        }
    }

    /// The request bytes as the client sends them to `port` with `key`.
    pub fn request_bytes(&self, port: u16, key: &str) -> Vec<u8> {
        let version = self.opts.version.as_deref().unwrap_or("HTTP/1.1");
        let mut head = Vec::new();
        head.extend_from_slice(self.method.as_bytes());
        head.push(b' ');
        match &self.target_hex {
            Some(h) => head.extend_from_slice(&unhex(h)),
            None => head.extend_from_slice(self.target.as_bytes()),
        }
        head.extend_from_slice(format!(" {version}").as_bytes());
        let mut lines = Vec::new();
        if !self.opts.no_host {
            lines.push(format!("Host: 127.0.0.1:{port}"));
        }
        lines.extend(self.headers.iter().map(|h| h.replace("{KEY}", key)));
        let body = self.body_bytes();
        if let Some(b) = &body {
            if !self.opts.no_cl {
                lines.push(format!("Content-Length: {}", b.len()));
            }
        }
        if self.opts.close {
            lines.push("Connection: close".into());
        }
        for line in lines {
            head.extend_from_slice(b"\r\n");
            head.extend_from_slice(line.as_bytes());
        }
        head.extend_from_slice(b"\r\n\r\n");
        head.extend(body.unwrap_or_default());
        head
    }
}

/// Sends one case on a fresh connection and reads its answer.
pub fn send(port: u16, key: &str, case: &Case) -> Answer {
    let started = Instant::now();
    let none = || Answer::new(None, Vec::new(), Vec::new());
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return none() };
    let _ = stream.set_read_timeout(Some(REQUEST_DEADLINE));
    if stream.write_all(&case.request_bytes(port, key)).is_err() {
        return none();
    }
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        if !read_more(&mut stream, &mut buf, started) {
            return none();
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut rest = buf[head_end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok());
    let headers: Vec<(String, String)> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap_or((l, ""));
            (k.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let body = if case.method == "HEAD" || matches!(status, Some(204 | 304)) {
        Vec::new()
    } else if let Some(n) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        while rest.len() < n && read_more(&mut stream, &mut rest, started) {}
        rest.truncate(n);
        rest
    } else if header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        dechunk(&mut stream, rest, started)
    } else {
        while read_more(&mut stream, &mut rest, started) {}
        rest
    };
    Answer::new(status, headers, body)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads what is there; false at end of stream, on error, or past the deadline.
fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>, started: Instant) -> bool {
    if started.elapsed() > REQUEST_DEADLINE {
        return false;
    }
    let mut chunk = [0u8; 65536];
    match stream.read(&mut chunk) {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

fn dechunk(stream: &mut TcpStream, mut data: Vec<u8>, started: Instant) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = find(&data, b"\r\n") {
                break i;
            }
            if !read_more(stream, &mut data, started) {
                return out;
            }
        };
        let size_text = String::from_utf8_lossy(&data[..line_end]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or(0);
        data.drain(..line_end + 2);
        if size == 0 {
            return out;
        }
        while data.len() < size + 2 {
            if !read_more(stream, &mut data, started) {
                return out;
            }
        }
        out.extend_from_slice(&data[..size]);
        data.drain(..size + 2);
    }
}
