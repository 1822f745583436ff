//! The SQ request model: `/api/v2/<route>?p=…&c=…&s=…` parsed into typed requests.
//!
//! The parser follows SQ's order of checks after the key: phext name (403), then route (404),
//! then the route's own parameters (400). The method and key checks come before it, at the edge.

use serde::{Deserialize, Serialize};

use crate::coord::Coordinate;
use crate::doc::contains_break;
use crate::error::ApiError;
use crate::name::{BadName, PhextName};
use crate::route::Route;

/// The largest request body, in bytes. Ten times a large scroll; bigger documents go in by
/// `sq-cloud import`, scroll by scroll.
pub const BODY_MAX_BYTES: usize = 16 * 1024 * 1024;

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

/// Which scrolls a `query` reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Selector {
    /// Every scroll from `from` to `to`, inclusive.
    Range { from: Coordinate, to: Coordinate },
    /// These coordinates, sorted and without repeats; absent scrolls answer empty text.
    Set(Vec<Coordinate>),
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
            | SqRequest::Query { p, .. } => Some(p),
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

    /// The value of the last parameter named `key`.
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.0.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_slice())
    }

    fn text(&self, key: &str) -> Result<Option<&str>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => std::str::from_utf8(v)
                .map(Some)
                .map_err(|_| ApiError::bad_request(format!("parameter {key} is not valid UTF-8"))),
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
    let name = match params.get("p") {
        None => None,
        Some(raw) => {
            let text = std::str::from_utf8(raw).map_err(|_| ApiError::BadPhextName)?;
            if text.is_empty() {
                None
            } else {
                Some(PhextName::parse(text).map_err(|BadName| ApiError::BadPhextName)?)
            }
        }
    };
    let route = Route::parse(route).ok_or(ApiError::NotFound)?;
    if method == Method::Post && !route.takes_post() {
        return Err(ApiError::NotFound);
    }
    if route == Route::Version {
        return Ok(SqRequest::Version);
    }
    let p = name.ok_or_else(|| ApiError::bad_request("missing phext name (p)"))?;
    let s = text_arg(&params, body)?;
    let coord = |key: &str| -> Result<Coordinate, ApiError> {
        let raw = params
            .text(key)?
            .ok_or_else(|| ApiError::bad_request(format!("missing coordinate ({key})")))?;
        Coordinate::parse(raw).map_err(|e| ApiError::bad_request(e.to_string()))
    };
    Ok(match route {
        Route::Version => SqRequest::Version,
        Route::Select => SqRequest::Select { p, c: coord("c")? },
        Route::Delete => SqRequest::Delete { p, c: coord("c")? },
        Route::Insert => SqRequest::Insert { p, c: coord("c")?, text: scroll_text(s)? },
        Route::Update => SqRequest::Update { p, c: coord("c")?, text: scroll_text(s)? },
        Route::Toc => SqRequest::Toc { p },
        Route::Get => SqRequest::Get { p },
        Route::Checksum => SqRequest::Checksum { p },
        Route::Delta => SqRequest::Delta { p, manifest: parse_manifest(&s.unwrap_or_default())? },
        Route::Query => parse_query(p, &params, s)?,
    })
}

/// The text argument: a non-empty body replaces `s`.
fn text_arg(params: &Params, body: &[u8]) -> Result<Option<String>, ApiError> {
    if body.len() > BODY_MAX_BYTES {
        return Err(ApiError::PayloadTooLarge { limit_bytes: BODY_MAX_BYTES as u64 });
    }
    if !body.is_empty() {
        return std::str::from_utf8(body)
            .map(|s| Some(s.to_string()))
            .map_err(|_| ApiError::bad_request("body is not valid UTF-8"));
    }
    Ok(params.text("s")?.map(str::to_string))
}

fn scroll_text(s: Option<String>) -> Result<String, ApiError> {
    let text = s.unwrap_or_default();
    if contains_break(&text) {
        return Err(ApiError::bad_request("text contains phext dimension breaks"));
    }
    Ok(text)
}

fn parse_manifest(text: &str) -> Result<Vec<(Coordinate, String)>, ApiError> {
    let mut out = Vec::new();
    for line in text.lines() {
        // SQ reads `<coord>: <checksum>` and skips lines without both parts.
        let Some((coord, hash)) = line.split_once(": ") else { continue };
        let hash = hash.split(": ").next().unwrap_or(hash);
        let c =
            Coordinate::parse(coord.trim()).map_err(|e| ApiError::bad_request(e.to_string()))?;
        if out.len() == DELTA_LINES_MAX {
            return Err(ApiError::bad_request(format!(
                "delta lists more than {DELTA_LINES_MAX} scrolls"
            )));
        }
        out.push((c, hash.to_string()));
    }
    Ok(out)
}

fn parse_query(p: PhextName, params: &Params, s: Option<String>) -> Result<SqRequest, ApiError> {
    let limit = match params.text("limit")? {
        None | Some("") => None,
        Some(raw) => Some(
            raw.parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("invalid limit {raw:?}")))?,
        ),
    };
    let coord =
        |raw: &str| Coordinate::parse(raw.trim()).map_err(|e| ApiError::bad_request(e.to_string()));
    let selector = match (params.text("from")?, params.text("to")?, params.text("set")?) {
        (Some(from), Some(to), _) => Selector::Range { from: coord(from)?, to: coord(to)? },
        (_, _, Some(set)) => Selector::Set(coord_list(set.split(','), &coord)?),
        _ => match s.filter(|s| !s.trim().is_empty()) {
            Some(lines) => Selector::Set(coord_list(lines.lines(), &coord)?),
            None => {
                return Err(ApiError::bad_request(
                    "query needs a range (from + to) or a set of coordinates",
                ))
            }
        },
    };
    Ok(SqRequest::Query { p, selector, limit })
}

fn coord_list<'a>(
    items: impl Iterator<Item = &'a str>,
    coord: &dyn Fn(&str) -> Result<Coordinate, ApiError>,
) -> Result<Vec<Coordinate>, ApiError> {
    let mut out = Vec::new();
    for item in items.filter(|i| !i.trim().is_empty()) {
        if out.len() == QUERY_SET_MAX {
            return Err(ApiError::bad_request(format!(
                "query lists more than {QUERY_SET_MAX} coordinates"
            )));
        }
        out.push(coord(item)?);
    }
    out.sort();
    out.dedup();
    Ok(out)
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
        assert!(matches!(get("select?c=1.1.1/1.1.1/1.1.1"), Err(ApiError::BadRequest(_))));
        assert!(matches!(get("select?p=m&c=garbage"), Err(ApiError::BadRequest(_))));
        assert_eq!(get("version"), Ok(SqRequest::Version));
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
        let big = vec![b'a'; BODY_MAX_BYTES + 1];
        assert!(matches!(
            parse(Method::Post, "update", "p=m&c=1.1.1/1.1.1/1.1.1", &big),
            Err(ApiError::PayloadTooLarge { .. })
        ));
    }
}
