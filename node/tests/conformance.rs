//! The recorded SQ 0.6.0 cases (`tests/fixtures/conformance-public.json`), run through
//! `proto::request::parse` and `Store::execute`, one fresh tenant per case.
//!
//! The gateway's checks that come before parsing (OPTIONS, method, key) are emulated here in its
//! order, so every step of every case runs; status and body bytes must match the recording.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use node::store::{ManualClock, RealVfs, Store, StoreConfig};
use proto::request::{parse, Method};
use proto::ApiError;
use serde_json::Value;

/// The tenant key the emulated client sends; any other key is wrong.
const KEY: &str = "pmb-v1-0123456789abcdef0123456789abcdef";
/// A quota no case comes near, in bytes.
const QUOTA_BYTES: u64 = 25 << 20;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/conformance-public.json")
}

/// The HTTP status of an error, as the gateway maps it.
fn status_of(e: &ApiError) -> u16 {
    match e {
        ApiError::BadRequest(_) => 400,
        ApiError::Unauthorized => 401,
        ApiError::BadPhextName | ApiError::Forbidden(_) => 403,
        ApiError::NotFound | ApiError::Missing(_) => 404,
        ApiError::PayloadTooLarge { .. } => 413,
        ApiError::AnswerTooLarge { .. } => 422,
        ApiError::RateLimited { .. } => 429,
        ApiError::Unavailable { .. } | ApiError::NotOwner { .. } => 503,
        ApiError::QuotaExceeded { .. } => 507,
        ApiError::Conflict(_) => 409,
        ApiError::Internal(_) => 500,
        ApiError::RequestTimeout { .. } => 408,
    }
}

/// The headers a step sends: its own, plus the key as its `auth` says (`bearer` by default).
fn headers(step: &Value) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = step["headers"]
        .as_object()
        .map(|h| {
            h.iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default();
    match step["auth"].as_str().unwrap_or("bearer") {
        "bearer" => out.insert("authorization".into(), format!("Bearer {KEY}")),
        "raw" => out.insert("authorization".into(), KEY.into()),
        "x-sq-api-key" => out.insert("x-sq-api-key".into(), KEY.into()),
        "none" => None,
        other => panic!("unknown auth {other:?}"),
    };
    out
}

/// The key the gateway reads: `Authorization` (with or without the case-insensitive word
/// Bearer), else `X-SQ-API-Key`.
fn presented_key(headers: &BTreeMap<String, String>) -> Option<String> {
    if let Some(v) = headers.get("authorization") {
        let v = v.trim();
        let bare = match v.get(..7) {
            Some(scheme) if scheme.eq_ignore_ascii_case("bearer ") => &v[7..],
            _ => v,
        };
        return Some(bare.trim().to_string());
    }
    headers.get("x-sq-api-key").map(|v| v.trim().to_string())
}

fn base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("bad base64 byte {c}"),
    };
    let digits: Vec<u8> =
        text.bytes().filter(|&c| c != b'=' && !c.is_ascii_whitespace()).map(value).collect();
    let mut out = Vec::new();
    for chunk in digits.chunks(4) {
        let n =
            chunk.iter().enumerate().fold(0u32, |acc, (i, &d)| acc | u32::from(d) << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// One step as the gateway and node together answer it: status and body.
fn answer(store: &Store, tenant: &str, step: &Value) -> (u16, Vec<u8>) {
    let method = step["method"].as_str().expect("step method");
    if method == "OPTIONS" {
        return (204, Vec::new());
    }
    let method = match method {
        "GET" => Method::Get,
        "POST" => Method::Post,
        _ => return (400, b"Bad Request".to_vec()),
    };
    if presented_key(&headers(step)).as_deref() != Some(KEY) {
        return (401, b"Unauthorized".to_vec());
    }
    let path = step["path"].as_str().expect("step path");
    let (route, query) =
        path.trim_start_matches('/').split_once('?').unwrap_or((path.trim_start_matches('/'), ""));
    let body = match (step.get("body_b64"), step.get("body")) {
        (Some(b64), _) => base64(b64.as_str().expect("body_b64 is text")),
        (None, Some(text)) => text.as_str().expect("body is text").as_bytes().to_vec(),
        (None, None) => Vec::new(),
    };
    let result = parse(method, route, query, &body)
        .and_then(|r| store.execute(tenant, QUOTA_BYTES, &r).map_err(ApiError::from));
    match result {
        Ok(response) => (200, response.body),
        Err(e) => (status_of(&e), e.to_string().into_bytes()),
    }
}

// Goal: every recorded step of every public case gets SQ's status and exact body bytes.
#[test]
fn public_conformance_cases_pass() {
    let cases: Vec<Value> =
        serde_json::from_slice(&std::fs::read(fixture()).expect("fixture is present"))
            .expect("fixture is JSON");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = StoreConfig { data_dir: dir.path().to_path_buf(), ..StoreConfig::default() };
    let store =
        Store::open(config, Arc::new(RealVfs), Arc::new(ManualClock::new(0))).expect("store opens");
    let (mut passed, mut failures) = (0usize, Vec::new());
    let steps: usize = cases.iter().map(|c| c["steps"].as_array().map_or(0, Vec::len)).sum();
    for (i, case) in cases.iter().enumerate() {
        let tenant = format!("case-{i}");
        let name = case["name"].as_str().unwrap_or("?");
        for (s, step) in case["steps"].as_array().expect("steps").iter().enumerate() {
            let (status, body) = answer(&store, &tenant, step);
            let mut why = Vec::new();
            if u64::from(status) != step["status"].as_u64().expect("status") {
                why.push(format!("status {status} != {}", step["status"]));
            }
            if let Some(want) = step["expect"].as_str().filter(|w| w.as_bytes() != body) {
                why.push(format!("body {:?} != {want:?}", String::from_utf8_lossy(&body)));
            }
            if let Some(want) = step["expect_b64"].as_str().map(base64).filter(|w| *w != body) {
                why.push(format!("bytes {body:?} != {want:?}"));
            }
            if let Some(want) =
                step["expect_prefix"].as_str().filter(|w| !body.starts_with(w.as_bytes()))
            {
                why.push(format!(
                    "body {:?} lacks prefix {want:?}",
                    String::from_utf8_lossy(&body)
                ));
            }
            if why.is_empty() {
                passed += 1;
            } else {
                failures.push(format!("{name} step {s} {}: {}", step["path"], why.join("; ")));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{passed} passed, {} failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(passed, steps, "every step ran and passed");
}
