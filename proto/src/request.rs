//! The SQ request model: `/api/v2/<route>?p=…&c=…&s=…` parsed into typed requests.
//!
//! The parser follows SQ's order of checks after the key: phext name (403), then route (404),
//! then the route's own parameters (400). The method and key checks come before it, at the edge.
//!
//! It reads what SQ 0.6.0 reads the way SQ reads it: a missing `p` is SQ's default document, a
//! missing `c` the origin, coordinates as [`Coordinate::parse`] says; `GET` takes its text from
//! `s=` and never from a body, `POST` from a non-empty body; `query` takes its set from `set=` or
//! else the body. What SQ would silently corrupt (dimension breaks in text, bytes that are not
//! UTF-8, writes above SQ's component range) is refused with a 400 that says so.

use serde::{Deserialize, Serialize};

use crate::coord::{break_dimension, BREAKS};
use crate::coord::{sq_would, Coordinate, SQ_COMPONENT_MAX};
use crate::error::ApiError;
use crate::name::{BadName, PhextName};
use crate::route::Route;

/// The largest request body, in bytes. Ten times a large scroll; bigger documents go in by
/// `sq-cloud import`, scroll by scroll.
pub const BODY_BYTES_MAX: usize = 16 * 1024 * 1024;

/// The most coordinates one `query` may list with `set=` or a body. Bounds the answer's size.
pub const QUERY_SET_MAX: usize = 10_000;

/// The most lines one `delta` manifest may hold.
pub const DELTA_LINES_MAX: usize = 1_000_000;

/// The version string `version` answers: the SQ release whose API this service speaks.
pub const SQ_API_VERSION: &str = "0.6.0";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
}

/// The `limit` SQ's `where` uses when none (or no number) is given: scrolls shorter than this
/// many bytes do not count towards the XOR hash.
pub const WHERE_LIMIT_DEFAULT: usize = 100;

/// Which scrolls a `query` reads: the non-empty scrolls of a range, and every coordinate of a set
/// (absent scrolls answer empty text); both at once answer their union, as SQ does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selector {
    /// Every non-empty scroll from the first coordinate to the second, inclusive.
    pub range: Option<(Coordinate, Coordinate)>,
    /// These coordinates, sorted and without repeats.
    pub set: Vec<Coordinate>,
}

/// How `where` turns a text into a coordinate, as SQ 0.6.0 names them (`algo=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WhereAlgo {
    /// XOR of the coordinates of the text's scrolls at least `limit` bytes long (the default).
    Xor,
    /// Components taken from the text's xxh3-128 checksum.
    Checksum,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SqRequest {
    Version,
    Select {
        p: PhextName,
        c: Coordinate,
    },
    Insert {
        p: PhextName,
        c: Coordinate,
        text: String,
    },
    Update {
        p: PhextName,
        c: Coordinate,
        text: String,
    },
    Delete {
        p: PhextName,
        c: Coordinate,
    },
    Toc {
        p: PhextName,
    },
    Get {
        p: PhextName,
    },
    Checksum {
        p: PhextName,
    },
    /// `manifest` lists scrolls the client holds with the checksum of each.
    Delta {
        p: PhextName,
        manifest: Vec<(Coordinate, String)>,
    },
    Query {
        p: PhextName,
        selector: Selector,
        limit: Option<usize>,
    },
    /// The tenant's view of the document: its name, size and scroll count.
    Status {
        p: PhextName,
    },
    /// SQ re-reads the document from disk; here it is loaded if it is not, and named.
    Load {
        p: PhextName,
    },
    /// Every scroll of the document in SQ's JSON export form.
    JsonExport {
        p: PhextName,
    },
    /// The coordinate SQ would infer for `text`; reads no document.
    Where {
        p: PhextName,
        text: String,
        algo: WhereAlgo,
        limit: usize,
    },
}

impl SqRequest {
    /// The route the request came in by.
    pub fn route(&self) -> Route {
        match self {
            SqRequest::Version => Route::Version,
            SqRequest::Select { .. } => Route::Select,
            SqRequest::Insert { .. } => Route::Insert,
            SqRequest::Update { .. } => Route::Update,
            SqRequest::Delete { .. } => Route::Delete,
            SqRequest::Toc { .. } => Route::Toc,
            SqRequest::Get { .. } => Route::Get,
            SqRequest::Checksum { .. } => Route::Checksum,
            SqRequest::Delta { .. } => Route::Delta,
            SqRequest::Query { .. } => Route::Query,
            SqRequest::Status { .. } => Route::Status,
            SqRequest::Load { .. } => Route::Load,
            SqRequest::JsonExport { .. } => Route::JsonExport,
            SqRequest::Where { .. } => Route::Where,
        }
    }

    /// True for requests that change the document.
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            SqRequest::Insert { .. } | SqRequest::Update { .. } | SqRequest::Delete { .. }
        )
    }

    /// The phext the request reads or writes, if any.
    pub fn phext(&self) -> Option<&PhextName> {
        match self {
            SqRequest::Version => None,
            SqRequest::Select { p, .. }
            | SqRequest::Insert { p, .. }
            | SqRequest::Update { p, .. }
            | SqRequest::Delete { p, .. }
            | SqRequest::Toc { p }
            | SqRequest::Get { p }
            | SqRequest::Checksum { p }
            | SqRequest::Delta { p, .. }
            | SqRequest::Query { p, .. }
            | SqRequest::Status { p }
            | SqRequest::Load { p }
            | SqRequest::JsonExport { p }
            | SqRequest::Where { p, .. } => Some(p),
        }
    }
}

/// A successful answer: the body bytes, and whether they are JSON rather than plain text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SqResponse {
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    pub json: bool,
}

impl SqResponse {
    pub fn text(body: impl Into<Vec<u8>>) -> SqResponse {
        SqResponse { body: body.into(), json: false }
    }
}

/// Decoded query parameters: split on `&`, `+` is a space, percent-escapes decoded, the last
/// duplicate wins.
#[derive(Debug, Default, Clone)]
pub struct Params(Vec<(String, Vec<u8>)>);

impl Params {
    /// Linear in the query: duplicates are kept and [`Params::get`] reads the last one, since
    /// removing each earlier duplicate on arrival made a query of many distinct names quadratic
    /// (40,000 names, 349 KB, took 40 s of a debug build).
    pub fn parse(query: &str) -> Params {
        let mut pairs: Vec<(String, Vec<u8>)> = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let key = String::from_utf8_lossy(&percent_decode(k)).into_owned();
            pairs.push((key, percent_decode(v)));
        }
        Params(pairs)
    }

    /// The name of every parameter, duplicates included, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.0.iter().map(|(k, _)| k.as_str())
    }

    /// The value of the last parameter named `key`.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_slice())
    }

    fn text(&self, key: &str) -> Result<Option<&str>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => utf8(v, &format!("parameter {key}")).map(Some),
        }
    }
}

fn percent_decode(raw: &str) -> Vec<u8> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'+' {
            out.push(b' ');
        } else if b == b'%'
            && i + 2 < bytes.len()
            && hex(bytes[i + 1]).is_some()
            && hex(bytes[i + 2]).is_some()
        {
            // Both digits were just checked.
            out.push(hex(bytes[i + 1]).unwrap_or(0) * 16 + hex(bytes[i + 2]).unwrap_or(0));
            i += 2;
        } else {
            out.push(b);
        }
        i += 1;
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Parses an authenticated request. `route` is the path after `/api/v2/`.
pub fn parse(method: Method, route: &str, query: &str, body: &[u8]) -> Result<SqRequest, ApiError> {
    let params = Params::parse(query);
    let p = match params.get("p") {
        None => PhextName::default_document(),
        Some(raw) => {
            let text = std::str::from_utf8(raw).map_err(|_| ApiError::BadPhextName)?;
            PhextName::parse(text).map_err(|BadName| ApiError::BadPhextName)?
        }
    };
    let route = Route::parse(route).ok_or(ApiError::NotFound)?;
    let served = match method {
        Method::Get => route.takes_get(),
        Method::Post => route.takes_post(),
    };
    if !served {
        return Err(ApiError::NotFound);
    }
    if body.len() > BODY_BYTES_MAX {
        return Err(ApiError::PayloadTooLarge { limit_bytes: BODY_BYTES_MAX as u64 });
    }
    // SQ reads a body only on POST, and only when it is not empty; a GET takes `s=`.
    let s = match method {
        Method::Post if !body.is_empty() => Some(utf8(body, "the body")?.to_string()),
        _ => params.text("s")?.map(str::to_string),
    };
    let c = || coordinate(&params);
    Ok(match route {
        Route::Version => SqRequest::Version,
        Route::Select => SqRequest::Select { p, c: c()? },
        Route::Delete => SqRequest::Delete { p, c: c()? },
        Route::Insert => {
            SqRequest::Insert { p, c: writable(&params, c()?)?, text: scroll_text(s)? }
        }
        Route::Update => {
            SqRequest::Update { p, c: writable(&params, c()?)?, text: scroll_text(s)? }
        }
        Route::Toc => SqRequest::Toc { p },
        Route::Get => SqRequest::Get { p },
        Route::Checksum => SqRequest::Checksum { p },
        Route::Delta => SqRequest::Delta { p, manifest: parse_manifest(&s.unwrap_or_default())? },
        Route::Query => parse_query(p, &params, body)?,
        Route::Status => SqRequest::Status { p },
        Route::Load => SqRequest::Load { p },
        Route::JsonExport => SqRequest::JsonExport { p },
        Route::Where => SqRequest::Where {
            p,
            text: s.unwrap_or_default(),
            algo: if params.get("algo") == Some(b"checksum") {
                WhereAlgo::Checksum
            } else {
                WhereAlgo::Xor
            },
            limit: params
                .text("limit")
                .ok()
                .flatten()
                .and_then(|l| l.parse().ok())
                .unwrap_or(WHERE_LIMIT_DEFAULT),
        },
    })
}

/// `c`, as SQ reads it: missing or empty is the origin.
fn coordinate(params: &Params) -> Result<Coordinate, ApiError> {
    let raw = params.text("c")?.unwrap_or("");
    Coordinate::parse(raw).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// Refuses a write above SQ's component range: libphext stops counting at 999, so no SQ client
/// or tool could read the text back where it was written.
fn writable(params: &Params, c: Coordinate) -> Result<Coordinate, ApiError> {
    if !c.above_sq_range() {
        return Ok(c);
    }
    let raw = params.text("c")?.unwrap_or("");
    Err(ApiError::bad_request(format!(
        "invalid coordinate {raw:?}: write components from 1 to {SQ_COMPONENT_MAX}, the range SQ and libphext can read back; {}",
        sq_would(raw)
    )))
}

/// Text as UTF-8, or a refusal that says where it is not and what SQ would have stored.
fn utf8<'a>(bytes: &'a [u8], what: &str) -> Result<&'a str, ApiError> {
    std::str::from_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        ApiError::bad_request(format!(
            "{what} is not valid UTF-8 (byte 0x{:02x} at offset {at}); send UTF-8 text, percent-encoded in a query; SQ 0.6.0 would store it with each invalid sequence replaced by U+FFFD",
            bytes[at]
        ))
    })
}

/// The names of the dimension breaks, library (0x01) down to scroll (0x17), as refusals say them.
const BREAK_NAMES: [&str; 9] =
    ["library", "shelf", "series", "collection", "volume", "book", "chapter", "section", "scroll"];

fn scroll_text(s: Option<String>) -> Result<String, ApiError> {
    let text = s.unwrap_or_default();
    let found = text.bytes().enumerate().find_map(|(i, b)| break_dimension(b).map(|d| (i, d)));
    if let Some((at, dim)) = found {
        return Err(ApiError::bad_request(format!(
            "the text holds a phext dimension break (byte 0x{:02x}, a {} break, at offset {at}); a scroll is text without bytes 0x01, 0x17-0x1a and 0x1c-0x1f: write each scroll at its own coordinate; SQ 0.6.0 would store it and its next reload would split the scroll there, moving the rest onto other coordinates",
            BREAKS[dim], BREAK_NAMES[dim]
        )));
    }
    Ok(text)
}

fn parse_manifest(text: &str) -> Result<Vec<(Coordinate, String)>, ApiError> {
    let mut out = Vec::new();
    for line in text.lines() {
        // SQ reads `<coord>: <checksum>` and skips lines without both parts.
        let Some((coord, hash)) = line.split_once(": ") else { continue };
        let hash = hash.split(": ").next().unwrap_or(hash);
        let c = Coordinate::parse(coord).map_err(|e| ApiError::bad_request(e.to_string()))?;
        if out.len() == DELTA_LINES_MAX {
            return Err(ApiError::bad_request(format!(
                "delta lists more than {DELTA_LINES_MAX} scrolls"
            )));
        }
        out.push((c, hash.to_string()));
    }
    Ok(out)
}

/// SQ's Coordinate Query API: a range (`from` and `to`, both or neither), a set (`set=`, else the
/// body; split on `,`, `;` and newlines), or both; full coordinates only; then `limit`. The
/// checks and their messages come in SQ's order.
fn parse_query(p: PhextName, params: &Params, body: &[u8]) -> Result<SqRequest, ApiError> {
    let bad = |m: String| ApiError::bad_request(m);
    let given = |key: &str| -> Result<Option<&str>, ApiError> {
        Ok(params.text(key)?.map(str::trim).filter(|v| !v.is_empty()))
    };
    let range = match (given("from")?, given("to")?) {
        (Some(a), Some(b)) => {
            let start = Coordinate::parse_full(a)
                .map_err(|_| bad(format!("invalid 'from' coordinate: {a}")))?;
            let end = Coordinate::parse_full(b)
                .map_err(|_| bad(format!("invalid 'to' coordinate: {b}")))?;
            if start > end {
                return Err(bad(format!("'from' ({a}) is after 'to' ({b})")));
            }
            Some((start, end))
        }
        (None, None) => None,
        _ => return Err(bad("a range needs both 'from' and 'to'".into())),
    };
    let listed = match params.text("set")? {
        Some(set) => set,
        None => utf8(body, "the body")?,
    };
    let mut set = Vec::new();
    for item in listed.split([',', '\n', ';']).map(str::trim).filter(|i| !i.is_empty()) {
        if set.len() == QUERY_SET_MAX {
            return Err(bad(format!("query lists more than {QUERY_SET_MAX} coordinates")));
        }
        set.push(
            Coordinate::parse_full(item)
                .map_err(|_| bad(format!("invalid coordinate in set: {item}")))?,
        );
    }
    if range.is_none() && set.is_empty() {
        return Err(bad("query needs a range (from + to) or a set of coordinates".into()));
    }
    let limit = match given("limit")? {
        None => None,
        Some(raw) => Some(raw.parse::<usize>().map_err(|_| bad(format!("invalid limit: {raw}")))?),
    };
    set.sort();
    set.dedup();
    Ok(SqRequest::Query { p, selector: Selector { range, set }, limit })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path_and_query: &str) -> Result<SqRequest, ApiError> {
        let (route, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
        parse(Method::Get, route, query, b"")
    }

    // Goal: query strings decode as SQ decodes them: `+` is a space, escapes decode, last wins.
    #[test]
    fn params_decode() {
        let p = Params::parse("s=a+b%2Bc%20d&c=1&c=2&x&bad=%zz%4");
        assert_eq!(p.get("s"), Some(&b"a b+c d"[..]));
        assert_eq!(p.get("c"), Some(&b"2"[..]));
        assert_eq!(p.get("x"), Some(&b""[..]));
        assert_eq!(p.get("bad"), Some(&b"%zz%4"[..]));
    }

    // Goal: the checks come in SQ's order: name, then route, then parameters.
    #[test]
    fn order_of_checks() {
        assert_eq!(get("nosuchroute?p=../x"), Err(ApiError::BadPhextName));
        assert_eq!(get("nosuchroute?p=m"), Err(ApiError::NotFound));
        assert_eq!(
            parse(Method::Post, "select", "p=m&c=1.1.1/1.1.1/1.1.1", b""),
            Err(ApiError::NotFound)
        );
        assert!(matches!(get("select?p=m&c=garbage"), Err(ApiError::BadRequest(_))));
        assert_eq!(get("version"), Ok(SqRequest::Version));
        assert_eq!(get("where?p=m"), Err(ApiError::NotFound), "where answers POST only");
        assert_eq!(parse(Method::Post, "status", "p=m", b""), Err(ApiError::NotFound));
    }

    // Goal: text with dimension breaks or invalid UTF-8 is refused; a body replaces `s`.
    #[test]
    fn text_rules() {
        assert!(matches!(
            get("update?p=m&c=1.1.1/1.1.1/1.1.1&s=a%17b"),
            Err(ApiError::BadRequest(_))
        ));
        assert!(matches!(
            get("update?p=m&c=1.1.1/1.1.1/1.1.1&s=%ff"),
            Err(ApiError::BadRequest(_))
        ));
        let r =
            parse(Method::Post, "insert", "p=m&c=1.1.1/1.1.1/1.1.1&s=ignored", b"body").unwrap();
        assert!(matches!(r, SqRequest::Insert { text, .. } if text == "body"));
        let big = vec![b'a'; BODY_BYTES_MAX + 1];
        assert!(matches!(
            parse(Method::Post, "update", "p=m&c=1.1.1/1.1.1/1.1.1", &big),
            Err(ApiError::PayloadTooLarge { .. })
        ));
    }

    // Goal: what SQ fills in is filled in the same way: no `p` is the default document, no `c`
    // the origin; a GET with a body still takes `s=`, a POST with an empty body too.
    #[test]
    fn defaults_and_bodies_as_sq() {
        let origin = Coordinate::ORIGIN;
        let default = PhextName::default_document();
        assert_eq!(get("select"), Ok(SqRequest::Select { p: default.clone(), c: origin }));
        assert_eq!(get("select?p=&c="), Ok(SqRequest::Select { p: default, c: origin }));
        let m = PhextName::parse("m").unwrap();
        let r = parse(Method::Get, "update", "p=m&s=from+s", b"from body").unwrap();
        assert_eq!(r, SqRequest::Update { p: m.clone(), c: origin, text: "from s".into() });
        let r = parse(Method::Post, "update", "p=m&s=from+s", b"").unwrap();
        assert_eq!(r, SqRequest::Update { p: m.clone(), c: origin, text: "from s".into() });
        let r = parse(Method::Get, "query", "p=m", b"1.1.1/1.1.1/1.1.2\n").unwrap();
        let two = Coordinate::parse("5").unwrap();
        assert!(
            matches!(r, SqRequest::Query { selector: Selector { range: None, set }, .. } if set.len() == 1 && set[0] != two)
        );
        let r = get("where?p=m").err();
        assert_eq!(r, Some(ApiError::NotFound));
        let r = parse(Method::Post, "where", "p=m&algo=checksum&limit=x", b"text").unwrap();
        assert_eq!(
            r,
            SqRequest::Where { p: m, text: "text".into(), algo: WhereAlgo::Checksum, limit: 100 }
        );
    }

    // Goal: a query's range and set are kept together (SQ answers their union), and its errors
    // are SQ's, word for word.
    #[test]
    fn query_as_sq() {
        let r = get("query?p=m&from=1.1.1/1.1.1/1.1.1&to=2.1.1/1.1.1/1.1.1&set=3.1.1/1.1.1/1.1.1;4.1.1/1.1.1/1.1.1").unwrap();
        assert!(
            matches!(r, SqRequest::Query { selector: Selector { range: Some(_), set }, .. } if set.len() == 2)
        );
        let err = |q: &str| get(q).unwrap_err().to_string();
        assert_eq!(
            err("query?p=m&from=1.1.1/1.1.1/1.1.1"),
            "Bad Request: a range needs both 'from' and 'to'"
        );
        assert_eq!(
            err("query?p=m&set=1.1.1/1.1"),
            "Bad Request: invalid coordinate in set: 1.1.1/1.1"
        );
        assert_eq!(
            err("query?p=m&from=1.1.1&to=2.1.1/1.1.1/1.1.1"),
            "Bad Request: invalid 'from' coordinate: 1.1.1"
        );
        assert_eq!(
            err("query?p=m&set=1.1.1/1.1.1/1.1.1&limit=abc"),
            "Bad Request: invalid limit: abc"
        );
        assert_eq!(
            err("query?p=m&from=2.1.1/1.1.1/1.1.1&to=1.1.1/1.1.1/1.1.1"),
            "Bad Request: 'from' (2.1.1/1.1.1/1.1.1) is after 'to' (1.1.1/1.1.1/1.1.1)"
        );
    }

    // Goal: what SQ silently corrupts is refused, and the refusal names the canonical form and
    // what SQ would have done.
    #[test]
    fn refusals_name_the_form_and_sq() {
        let err = |q: &str| get(q).unwrap_err().to_string();
        let words = err("update?p=m&c=test-agent.1.1/test.basic/1.1.1&s=x");
        assert!(
            words.contains("L.S.S/C.V.B/C.S.S")
                && words.contains("SQ 0.6.0 would read it as 1.1.0/0.1.1/1.1.1"),
            "{words}"
        );
        let big = err("update?p=m&c=2026.2.22/1.1.1/1.1.1&s=x");
        assert!(big.contains("from 1 to 999") && big.contains("999.2.22/1.1.1/1.1.1"), "{big}");
        assert!(get("select?p=m&c=2026.2.22/1.1.1/1.1.1").is_ok(), "reads above 999 harm nothing");
        let breaks = err("update?p=m&s=a%17b");
        assert!(
            breaks.contains("0x17, a scroll break, at offset 1")
                && breaks.contains("SQ 0.6.0 would"),
            "{breaks}"
        );
        let bytes = err("update?p=m&s=a%FFb");
        assert!(bytes.contains("byte 0xff at offset 1") && bytes.contains("U+FFFD"), "{bytes}");
    }
}
