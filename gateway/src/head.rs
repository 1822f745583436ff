//! The request line as SQ 0.6.0 reads it, and when to close a connection as SQ clients expect.
//!
//! SQ reads a request line as text: the target is everything between the method and the
//! trailing ` HTTP/1.1`, and its query is split on `&` and `=`, then percent-decoded. SQ
//! clients therefore send bytes that HTTP forbids in a target: the quotes and braces of pasted
//! JSON, the `<` `>` of HTML, `#`, tabs, bytes above ASCII, and from raw-socket clients even
//! spaces. hyper refuses such a request line (400 with an empty body), and the URI parser cuts
//! the target at `#`. So the gateway reads the first request head of a connection itself,
//! percent-encodes exactly those bytes in the target ([`repair_request_line`]) and hands the
//! repaired head to hyper; proto's query decoding turns them back into the bytes the client
//! sent. Nothing else in the head is touched: header lines are parsed by hyper as strictly as
//! ever.
//!
//! Only the first request of a connection is repaired. SQ answers one request per connection,
//! so no SQ client sends a second, and a connection whose first request needed repair is closed
//! after its answer ([`CloseRule`]).

use axum::http::header::HOST;
use axum::http::{HeaderMap, Version};

/// The largest request head read before hyper sees it: hyper's own limit for the heads it reads
/// (its default buffer, 8 KiB + 100 × 4 KiB), so the first head of a connection is held to
/// the same bound as every later one. SQ's own limit is 64 KiB.
pub const HEAD_BYTES_MAX: usize = 8192 + 4096 * 100;

/// The versions a repairable request line ends with.
const VERSIONS: [&[u8]; 2] = [b" HTTP/1.1", b" HTTP/1.0"];

/// Where the head in `buf` ends (just past its blank line), if it is complete. A bare LF ends
/// a line as well as CR LF, as hyper's parser allows.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(at) = buf[i..].iter().position(|&b| b == b'\n') {
        let lf = i + at;
        match buf.get(lf + 1) {
            Some(b'\n') => return Some(lf + 2),
            Some(b'\r') if buf.get(lf + 2) == Some(&b'\n') => return Some(lf + 3),
            _ => i = lf + 1,
        }
    }
    None
}

/// A byte SQ clients send raw in a target that HTTP forbids there or gives another meaning
/// (`#` starts a fragment). `%` stays as it is: clients send escapes, and a stray `%` is left
/// for the query decoder, as SQ leaves it.
fn needs_escape(b: u8) -> bool {
    b <= b' '
        || b >= 0x7f
        || matches!(b, b'"' | b'#' | b'<' | b'>' | b'\\' | b'^' | b'`' | b'{' | b'|' | b'}')
}

/// The head with its request line's target percent-encoded where HTTP forbids a byte, or
/// `None` when nothing needs repair or the line is not `METHOD /target HTTP/1.x`. The version
/// is recognised as the last token of the line, so a space inside the target becomes `%20`.
pub fn repair_request_line(head: &[u8]) -> Option<Vec<u8>> {
    let line_end = head.iter().position(|&b| b == b'\n')?;
    let line = head[..line_end].strip_suffix(b"\r").unwrap_or(&head[..line_end]);
    let method_end = line.iter().position(|&b| b == b' ')?;
    if method_end == 0 || !line[..method_end].iter().all(|b| b.is_ascii_alphabetic()) {
        return None;
    }
    let version = VERSIONS.iter().find(|v| line.ends_with(v))?;
    let target = line.get(method_end + 1..line.len() - version.len())?;
    if target.first() != Some(&b'/') || !target.iter().any(|&b| needs_escape(b)) {
        return None;
    }
    let mut out = Vec::with_capacity(head.len() + 2 * target.len());
    out.extend_from_slice(&line[..=method_end]);
    for &b in target {
        if needs_escape(b) {
            out.extend_from_slice(format!("%{b:02X}").as_bytes());
        } else {
            out.push(b);
        }
    }
    out.extend_from_slice(version);
    out.extend_from_slice(&head[line.len()..]);
    Some(out)
}

/// When a connection is closed after an answer although the client did not ask for it.
///
/// SQ 0.6.0 closes every connection after one answer, and some of its clients read the answer
/// to the end of the stream rather than by `Content-Length`: they would wait for the idle
/// timeout. They are told apart from keep-alive clients by what they send:
/// - `Connection: close`, or HTTP/1.0 without keep-alive: hyper closes these already;
/// - an HTTP/1.1 request without `Host`: every HTTP/1.1 library sends one, a hand-written
///   raw-socket client often does not;
/// - a first request whose line needed repair: no HTTP library sends such a line;
/// - on plain HTTP, a `Host` naming another port than the one the request reached: `sq route`
///   forwards its client's head unchanged to a backend on 127.0.0.1 and reads to the end of
///   the stream, and its client's `Host` names the router. A keep-alive proxy that keeps the
///   client's `Host` loses connection reuse to the gateway, not correctness. Over TLS the
///   port seen and the port in `Host` often differ behind a load balancer, so this rule is
///   for plain HTTP only (which serves loopback only), where `sq route` runs.
#[derive(Debug, Clone, Copy)]
pub struct CloseRule {
    /// The port the listener accepted the connection on.
    pub local_port: u16,
    /// Plain HTTP (the last rule applies).
    pub plain: bool,
}

impl CloseRule {
    /// Whether to answer this request with `Connection: close`. `repaired`: its request line
    /// was repaired.
    pub fn close_after(&self, version: Version, headers: &HeaderMap, repaired: bool) -> bool {
        if version != Version::HTTP_11 {
            return false;
        }
        let Some(host) = headers.get(HOST) else { return true };
        repaired || (self.plain && host_port(host.as_bytes()).is_some_and(|p| p != self.local_port))
    }
}

/// The port a `Host` value names (80 when it names none), or `None` when it is malformed.
fn host_port(host: &[u8]) -> Option<u16> {
    let host = std::str::from_utf8(host).ok()?.trim();
    let port = match host.rfind([':', ']']) {
        Some(i) if host.as_bytes()[i] == b':' => &host[i + 1..],
        _ => return Some(80),
    };
    port.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repaired(head: &str) -> Option<String> {
        repair_request_line(head.as_bytes()).map(|h| String::from_utf8(h).unwrap())
    }

    // Goal: every byte SQ clients send raw in `s=` becomes an escape hyper accepts, the version
    // is found as the last token, and the header lines after the request line are unchanged.
    #[test]
    fn raw_targets_are_escaped() {
        let cases = [
            ("GET /api/v2/insert?s=say\"hi\" HTTP/1.1", "/api/v2/insert?s=say%22hi%22"),
            (
                "GET /api/v2/insert?s={\"k\":\"v\"} HTTP/1.1",
                "/api/v2/insert?s=%7B%22k%22:%22v%22%7D",
            ),
            ("GET /api/v2/insert?s=<b> HTTP/1.1", "/api/v2/insert?s=%3Cb%3E"),
            ("GET /api/v2/insert?s=a#b HTTP/1.1", "/api/v2/insert?s=a%23b"),
            ("GET /api/v2/insert?s=a\tb HTTP/1.1", "/api/v2/insert?s=a%09b"),
            ("GET /api/v2/insert?s=two words HTTP/1.0", "/api/v2/insert?s=two%20words"),
            ("GET /api/v2/insert?s=é|^` HTTP/1.1", "/api/v2/insert?s=%C3%A9%7C%5E%60"),
            ("POST /api/v2/insert?s=a b HTTP/1.1 HTTP/1.1", "/api/v2/insert?s=a%20b%20HTTP/1.1"),
        ];
        for (line, target) in cases {
            let version = &line[line.len() - 8..];
            let method = line.split(' ').next().unwrap();
            let head = format!("{line}\r\nHost: h\r\nX-A: \"q\"\r\n\r\nbody");
            let want = format!("{method} {target} {version}\r\nHost: h\r\nX-A: \"q\"\r\n\r\nbody");
            assert_eq!(repaired(&head).as_deref(), Some(want.as_str()), "{line:?}");
        }
    }

    // Goal: a line that needs nothing, or that is not an origin-form HTTP/1.x request line, is
    // left for hyper to judge exactly as before (so nothing else is loosened).
    #[test]
    fn other_lines_are_untouched() {
        for head in [
            "GET /api/v2/select?p=a&c=1.1.1/1.1.1/1.1.1&s=%22 HTTP/1.1\r\n\r\n",
            "GET http://h/x y HTTP/1.1\r\n\r\n",
            "GET /x y HTTP/2.0\r\n\r\n",
            "GET /x y\r\n\r\n",
            "G\"T /x y HTTP/1.1\r\n\r\n",
            " /x y HTTP/1.1\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET /x y HTTP/1.1",
        ] {
            assert_eq!(repaired(head), None, "{head:?}");
        }
    }

    // Goal: the end of a head is found after CR LF CR LF or LF LF, never inside a line.
    #[test]
    fn head_ends() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: h\r\n\r\nrest"), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: h\n\nrest"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: h\r\n"), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r"), None);
        assert_eq!(head_end(b""), None);
    }

    // Goal: only clients that read to the end of the stream are closed on: no Host, a repaired
    // line, or (plain HTTP only) a Host for another port; keep-alive clients keep their
    // connection.
    #[test]
    fn close_rule() {
        let headers = |host: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(v) = host {
                h.insert(HOST, v.parse().unwrap());
            }
            h
        };
        let plain = CloseRule { local_port: 18680, plain: true };
        let tls = CloseRule { local_port: 443, plain: false };
        let v11 = Version::HTTP_11;
        assert!(!plain.close_after(v11, &headers(Some("127.0.0.1:18680")), false));
        assert!(!plain.close_after(v11, &headers(Some("[::1]:18680")), false));
        assert!(plain.close_after(v11, &headers(Some("127.0.0.1:18680")), true));
        assert!(plain.close_after(v11, &headers(None), false));
        assert!(plain.close_after(v11, &headers(Some("localhost:1337")), false));
        assert!(plain.close_after(v11, &headers(Some("localhost")), false));
        assert!(plain.close_after(v11, &headers(Some("[::1]")), false));
        assert!(!plain.close_after(v11, &headers(Some("localhost:x")), false));
        assert!(!tls.close_after(v11, &headers(Some("example.com")), false));
        assert!(!tls.close_after(v11, &headers(Some("example.com:8443")), false));
        assert!(tls.close_after(v11, &headers(None), false));
        assert!(!plain.close_after(Version::HTTP_10, &headers(None), true));
        assert!(!plain.close_after(Version::HTTP_2, &headers(None), false));
    }
}
