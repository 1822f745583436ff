//! The declarative tenants file, applied to the registry and re-applied within
//! [`POLL_INTERVAL`] of any change that moves its length, inode or times (within
//! [`FULL_READ_INTERVAL`] of one that does not). Two forms, told apart by the first byte that is not
//! whitespace (`{` is JSON):
//!
//! - JSON, the seeds' `tenants.json` shape: `{"admin_key"?: "...", "tenants": [{"id", "api_key",
//!   "quota_mb"?, "enabled"?, "tier"?}]}`; `api_key_hash` (and `admin_key_hash`), the SHA-256 of
//!   the key as `sha256sum` prints it, may stand in for the key and keeps it off the nodes, and `daily_limit`, `admin_email` may be given. Keys are hashed as soon as the file
//!   is read; only hashes reach the registry.
//! - phext, the auth registry as the ranch mesh keeps it: one scroll per tenant holding its key
//!   hash, tier and metadata, never a key ([`phext`]). `sq-cloud admin tenants export --phext`
//!   writes the registry in this form.
//!
//! A malformed file is refused as a whole with one clear log line, and the registry is left as it
//! was. Tenants missing from the file are left alone: removing a tenant is an explicit admin
//! action.

pub mod phext;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proto::auth::{is_valid_key_hash, key_hash, valid_tenant_id};
use proto::cluster::MIB;
use raft_registry::{Command, TenantRecord, Tier};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::service::Service;

/// How often the file is checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The largest tenants file read, in bytes.
const FILE_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// Why a tenants file was refused: the whole file, naming the tenant, scroll or field at fault.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read the file: {0}")]
    Read(#[from] std::io::Error),
    #[error("file is larger than {FILE_BYTES_MAX} bytes")]
    TooLarge,
    #[error("not a tenants file: {0}")]
    NotJson(#[from] serde_json::Error),
    #[error("not a phext: {0}")]
    NotPhext(#[from] proto::doc::FormatError),
    #[error("give admin_key or admin_key_hash, not both")]
    AdminKeyTwice,
    #[error("admin_key_hash must be 64 lowercase hex digits (SHA-256)")]
    AdminKeyHashMalformed,
    #[error("tenant id {0:?} must match [a-z0-9][a-z0-9-]{{0,62}}")]
    TenantIdInvalid(String),
    #[error("tenant {0} is listed twice")]
    TenantTwice(String),
    #[error("tenant {0}: api_key is too short to be a key")]
    KeyTooShort(String),
    #[error("tenant {0}: give one of api_key and api_key_hash")]
    KeyMissing(String),
    #[error("tenant {0}: the key hash must be 64 lowercase hex digits")]
    KeyHashMalformed(String),
    #[error("tenant {tenant}: unknown tier {tier:?}")]
    UnknownTier { tenant: String, tier: String },
    #[error("scroll {at}: {problem}")]
    Scroll { at: proto::Coordinate, problem: ScrollProblem },
    #[error("registry refused the file's change: {0}")]
    Registry(#[from] raft_registry::RegistryError),
}

/// What is wrong with one scroll of the phext form.
#[derive(Debug, thiserror::Error)]
pub enum ScrollProblem {
    #[error("{0:?} is not `field: value`")]
    NotAField(String),
    #[error("the phext form holds key hashes only: write key_hash, never the key")]
    KeyNotHash,
    #[error("unknown field {0:?}")]
    UnknownField(String),
    #[error("field {0} is given twice")]
    FieldTwice(String),
    #[error("admin_key_hash stands in a scroll of its own")]
    AdminKeyHashNotAlone,
    #[error("a second admin_key_hash")]
    AdminKeyHashTwice,
    #[error("a tenant's scroll needs {0}")]
    FieldMissing(&'static str),
    #[error("{field} {value:?} is not a whole number")]
    NotANumber { field: &'static str, value: String },
    #[error("enabled {0:?} is neither true nor false")]
    NotABool(String),
}

/// A tenants file, either form, with keys already hashed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TenantsFile {
    pub admin_key_hash: Option<String>,
    pub tenants: Vec<FileTenant>,
}

/// One tenant of the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileTenant {
    pub id: String,
    /// SHA-256 of the tenant's key, 64 lowercase hex digits.
    pub key_hash: String,
    pub tier: Option<String>,
    pub quota_mb: Option<u64>,
    pub daily_limit: Option<u64>,
    pub enabled: bool,
    pub admin_email: Option<String>,
    /// When the tenant was added; used only when the file adds it.
    pub created_at_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonFile {
    admin_key: Option<String>,
    admin_key_hash: Option<String>,
    tenants: Vec<JsonTenant>,
    /// Accepted for compatibility with the seeds' shape; the file is always watched.
    #[serde(default, rename = "reload_on_change")]
    _reload_on_change: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonTenant {
    id: String,
    api_key: Option<String>,
    api_key_hash: Option<String>,
    quota_mb: Option<u64>,
    daily_limit: Option<u64>,
    #[serde(default = "yes")]
    enabled: bool,
    tier: Option<String>,
    admin_email: Option<String>,
    created_at_ms: Option<u64>,
    /// Accepted for compatibility with the seeds' shape; data lives where the owner keeps it.
    #[serde(default, rename = "data_dir")]
    _data_dir: Option<String>,
}

fn yes() -> bool {
    true
}

/// Parses and checks the whole file, in either form; any error refuses all of it.
pub fn parse(bytes: &[u8]) -> Result<TenantsFile, FileError> {
    let json = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    let file = if json { parse_json(bytes)? } else { phext::parse(bytes)? };
    check(&file)?;
    Ok(file)
}

fn parse_json(bytes: &[u8]) -> Result<TenantsFile, FileError> {
    let file: JsonFile = serde_json::from_slice(bytes)?;
    let admin_key_hash = match (file.admin_key, file.admin_key_hash) {
        (Some(_), Some(_)) => return Err(FileError::AdminKeyTwice),
        (Some(key), None) => Some(key_hash(&key)),
        (None, hash) => hash,
    };
    let mut tenants = Vec::with_capacity(file.tenants.len());
    for t in file.tenants {
        let key_hash = match (t.api_key, t.api_key_hash) {
            (Some(key), None) if key.len() < 16 => return Err(FileError::KeyTooShort(t.id)),
            (Some(key), None) => key_hash(&key),
            (None, Some(hash)) => hash,
            _ => return Err(FileError::KeyMissing(t.id)),
        };
        tenants.push(FileTenant {
            id: t.id,
            key_hash,
            tier: t.tier,
            quota_mb: t.quota_mb,
            daily_limit: t.daily_limit,
            enabled: t.enabled,
            admin_email: t.admin_email,
            created_at_ms: t.created_at_ms,
        });
    }
    Ok(TenantsFile { admin_key_hash, tenants })
}

/// The rules both forms obey.
fn check(file: &TenantsFile) -> Result<(), FileError> {
    if file.admin_key_hash.as_deref().is_some_and(|h| !is_valid_key_hash(h)) {
        return Err(FileError::AdminKeyHashMalformed);
    }
    let mut seen = std::collections::HashSet::new();
    for t in &file.tenants {
        if !valid_tenant_id(&t.id) {
            return Err(FileError::TenantIdInvalid(t.id.clone()));
        }
        if !seen.insert(&t.id) {
            return Err(FileError::TenantTwice(t.id.clone()));
        }
        if !is_valid_key_hash(&t.key_hash) {
            return Err(FileError::KeyHashMalformed(t.id.clone()));
        }
        if let Some(tier) = t.tier.as_ref().filter(|tier| Tier::parse(tier).is_none()) {
            return Err(FileError::UnknownTier { tenant: t.id.clone(), tier: tier.clone() });
        }
    }
    Ok(())
}

/// The JSON form of a file, with key hashes (`api_key_hash`) and never keys.
pub fn to_json(file: &TenantsFile) -> serde_json::Value {
    let tenants: Vec<serde_json::Value> = file
        .tenants
        .iter()
        .map(|t| {
            let mut v = serde_json::json!({
                "id": t.id, "api_key_hash": t.key_hash, "tier": t.tier, "quota_mb": t.quota_mb,
                "daily_limit": t.daily_limit, "enabled": t.enabled, "admin_email": t.admin_email,
                "created_at_ms": t.created_at_ms,
            });
            if let Some(o) = v.as_object_mut() {
                o.retain(|_, x| !x.is_null());
            }
            v
        })
        .collect();
    let mut out = serde_json::json!({ "tenants": tenants });
    if let (Some(h), Some(o)) = (&file.admin_key_hash, out.as_object_mut()) {
        o.insert("admin_key_hash".into(), h.clone().into());
    }
    out
}

/// The file that describes `state`'s tenants (archived ones left out: they cannot sign in).
pub fn from_registry(state: &raft_registry::RegistryState) -> TenantsFile {
    TenantsFile {
        admin_key_hash: state.admin_key_hash().map(str::to_string),
        tenants: state
            .tenants()
            .filter(|t| !t.archived && t.key_hashes.len() == 1)
            .map(|t| FileTenant {
                id: t.id.clone(),
                key_hash: t.key_hashes[0].clone(),
                tier: Some(t.tier.as_str().to_string()),
                quota_mb: Some(t.quota_bytes / MIB),
                daily_limit: Some(t.daily_limit),
                enabled: t.enabled,
                admin_email: t.admin_email.clone(),
                created_at_ms: Some(t.created_at_ms),
            })
            .collect(),
    }
}

/// The commands that make the registry match the file.
pub fn commands(
    file: &TenantsFile,
    state: &raft_registry::RegistryState,
    now_ms: u64,
) -> Vec<Command> {
    let mut out = Vec::new();
    if let Some(hash) = &file.admin_key_hash {
        if state.admin_key_hash() != Some(hash.as_str()) {
            out.push(Command::SetAdminKeyHash { hash: hash.clone() });
        }
    }
    for t in &file.tenants {
        let hash = t.key_hash.clone();
        let tier = t.tier.as_deref().and_then(Tier::parse);
        let quota_bytes = t.quota_mb.map(|mb| mb.saturating_mul(MIB));
        match state.tenant(&t.id) {
            // A purged id is never reused; the rest of the file still applies.
            None if state.is_purged(&t.id) => {
                tracing::warn!(tenant = %t.id, "the tenants file lists a purged tenant; ids of purged tenants are never reused");
            }
            None => {
                let tier = tier.unwrap_or(Tier::Free);
                out.push(Command::AddTenant(TenantRecord {
                    id: t.id.clone(),
                    tier,
                    quota_bytes: quota_bytes.unwrap_or(tier.default_quota_bytes()),
                    daily_limit: t.daily_limit.unwrap_or(tier.default_daily_limit()),
                    key_hashes: vec![hash],
                    enabled: t.enabled,
                    archived: false,
                    created_at_ms: t.created_at_ms.unwrap_or(now_ms),
                    admin_email: t.admin_email.clone(),
                }));
            }
            Some(r) => {
                if r.key_hashes != [hash.clone()] {
                    out.push(Command::RotateKey { id: t.id.clone(), new_hash: hash });
                }
                let quota_changed = quota_bytes.is_some_and(|q| q != r.quota_bytes);
                let tier_changed = tier.is_some_and(|x| x != r.tier);
                let limit_changed = t.daily_limit.is_some_and(|l| l != r.daily_limit);
                if quota_changed || tier_changed || limit_changed || r.enabled != t.enabled {
                    out.push(Command::UpdateTenant {
                        id: t.id.clone(),
                        tier: tier.filter(|_| tier_changed),
                        quota_bytes: quota_bytes.filter(|_| quota_changed),
                        daily_limit: t.daily_limit.filter(|_| limit_changed),
                        enabled: Some(t.enabled),
                    });
                }
            }
        }
    }
    out
}

/// Watches the file until `shutdown`, applying it on this node while it leads the registry.
pub async fn watch(path: PathBuf, svc: Arc<Service>, shutdown: CancellationToken) {
    let mut applied: Option<Applied> = None;
    loop {
        if svc.registry.status().leader == Some(svc.id) {
            if let Err(e) = check_file(&path, &svc, &mut applied).await {
                tracing::warn!(path = %path.display(), error = %e, "cannot read tenants file");
            }
        } else {
            // A new leader re-applies the file from scratch.
            applied = None;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
        }
    }
}

/// How often the file is read in full even when its metadata says it has not changed: an edit in
/// place within one tick of the file system's clock, keeping its length, leaves every stamp as it
/// was.
pub const FULL_READ_INTERVAL: Duration = Duration::from_secs(60);

/// The file's metadata that changes with its content: checked every [`POLL_INTERVAL`] so that the
/// file (9 MB at 100,000 tenants) is read only when it may have changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// The file this leader last applied or refused: its stamp, when it was read, and a digest of its
/// bytes (not the bytes themselves).
struct Applied {
    stamp: Stamp,
    read_at: tokio::time::Instant,
    digest: u128,
}

/// Whether the file must be read: never read by this leader, its stamp moved, or
/// [`FULL_READ_INTERVAL`] has passed since the last read.
fn read_due(applied: Option<&Applied>, stamp: Stamp, now: tokio::time::Instant) -> bool {
    applied.is_none_or(|a| a.stamp != stamp || now.duration_since(a.read_at) >= FULL_READ_INTERVAL)
}

/// One poll: reads the file if it may have changed, and applies it if its bytes did.
async fn check_file(
    path: &std::path::Path,
    svc: &Service,
    applied: &mut Option<Applied>,
) -> Result<(), FileError> {
    let meta = tokio::fs::metadata(path).await?;
    let stamp = Stamp::of(&meta);
    let now = tokio::time::Instant::now();
    if !read_due(applied.as_ref(), stamp, now) {
        return Ok(());
    }
    if meta.len() > FILE_BYTES_MAX {
        return Err(FileError::TooLarge);
    }
    let bytes = tokio::fs::read(path).await?;
    let digest = xxhash_rust::xxh3::xxh3_128(&bytes);
    let unchanged = applied.as_ref().is_some_and(|a| a.digest == digest);
    // Stamped before the read: an edit during the read moves the stamp again and is read next poll.
    *applied = Some(Applied { stamp, read_at: now, digest });
    if unchanged {
        return Ok(());
    }
    match apply(svc, &bytes).await {
        Ok(n) => tracing::info!(path = %path.display(), changes = n, "tenants file applied"),
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "tenants file refused; registry unchanged")
        }
    }
    Ok(())
}

async fn apply(svc: &Service, bytes: &[u8]) -> Result<usize, FileError> {
    let file = parse(bytes)?;
    let commands = commands(&file, &svc.registry.state(), svc.wall_ms());
    let n = commands.len();
    // Committed together, a batch per Raft round, rather than one round per tenant.
    for outcome in svc.registry.write_all(commands).await {
        outcome?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the file is read when this leader never read it, when any part of its stamp moved,
    // and once FULL_READ_INTERVAL has passed; otherwise a poll costs one stat.
    #[test]
    fn the_file_is_read_only_when_it_may_have_changed() {
        let stamp = Stamp { dev: 1, ino: 2, len: 3, mtime_ns: 4, ctime_ns: 5 };
        let t0 = tokio::time::Instant::now();
        let applied = Applied { stamp, read_at: t0, digest: 0 };
        assert!(read_due(None, stamp, t0));
        assert!(!read_due(Some(&applied), stamp, t0));
        assert!(!read_due(
            Some(&applied),
            stamp,
            t0 + FULL_READ_INTERVAL - Duration::from_millis(1)
        ));
        assert!(read_due(Some(&applied), stamp, t0 + FULL_READ_INTERVAL));
        for moved in [
            Stamp { dev: 9, ..stamp },
            Stamp { ino: 9, ..stamp },
            Stamp { len: 9, ..stamp },
            Stamp { mtime_ns: 9, ..stamp },
            Stamp { ctime_ns: 9, ..stamp },
        ] {
            assert!(read_due(Some(&applied), moved, t0), "{moved:?}");
        }
    }

    // Goal: a malformed or inconsistent file is refused as a whole, a good one accepted.
    #[test]
    fn parse_checks_everything() {
        let good = br#"{"tenants":[{"id":"will","api_key":"pmb-v1-6da75a3244e11b5be2065421b246f16a","data_dir":"/x","quota_mb":1000,"enabled":true}],"reload_on_change":true}"#;
        assert_eq!(parse(good).unwrap().tenants.len(), 1);
        for bad in [
            &br#"{"tenants":[{"id":"Bad","api_key":"pmb-v1-6da75a3244e11b5be2065421b246f16a"}]}"#[..],
            br#"{"tenants":[{"id":"a","api_key":"short"}]}"#,
            br#"{"tenants":[{"id":"a","api_key":"pmb-v1-6da75a3244e11b5be2065421b246f16a"},{"id":"a","api_key":"pmb-v1-6da75a3244e11b5be2065421b246f16b"}]}"#,
            br#"{"tenants":[{"id":"a","api_key":"pmb-v1-6da75a3244e11b5be2065421b246f16a","tier":"gold"}]}"#,
            br#"{"tenants": 3}"#,
            b"not json",
            br#"{"tenants":[{"id":"a"}]}"#,
            br#"{"tenants":[{"id":"a","api_key_hash":"ABC"}]}"#,
            br#"{"admin_key_hash":"123","tenants":[]}"#,
            br#"{"admin_key":"pmb-v1-6da75a3244e11b5be2065421b246f16a","admin_key_hash":"6da75a3244e11b5be2065421b246f16a6da75a3244e11b5be2065421b246f16a","tenants":[]}"#,
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    // Goal: a purged tenant still listed in the file is skipped (its id is retired), while the
    // file's other tenants are still added.
    #[test]
    fn a_purged_tenant_in_the_file_is_skipped() {
        let mut state = raft_registry::RegistryState::default();
        let gone = TenantRecord::new(
            "gone".into(),
            Tier::Free,
            key_hash("pmb-v1-00000000000000000000000000000001"),
            0,
        );
        for c in [
            Command::AddTenant(gone),
            Command::ArchiveTenant { id: "gone".into() },
            Command::PurgeTenant { id: "gone".into() },
        ] {
            raft_registry::command::apply(&mut state, c).expect("applies");
        }
        let file = br#"{"tenants":[
            {"id":"gone","api_key":"pmb-v1-00000000000000000000000000000002","enabled":true},
            {"id":"new","api_key":"pmb-v1-00000000000000000000000000000003","enabled":true}]}"#;
        let planned = commands(&parse(file).expect("valid file"), &state, 1);
        assert_eq!(planned.len(), 1, "{planned:?}");
        assert!(matches!(&planned[0], Command::AddTenant(r) if r.id == "new"), "{planned:?}");
    }

    // Goal: the hash forms reach the registry as given, and name the same key as the plain forms.
    #[test]
    fn hash_forms_match_plain_keys() {
        let (admin, tenant) =
            ("pmb-v1-00000000000000000000000000000009", "pmb-v1-00000000000000000000000000000008");
        let hashed = format!(
            r#"{{"admin_key_hash":"{}","tenants":[{{"id":"t","api_key_hash":"{}"}}]}}"#,
            key_hash(admin),
            key_hash(tenant)
        );
        let plain =
            format!(r#"{{"admin_key":"{admin}","tenants":[{{"id":"t","api_key":"{tenant}"}}]}}"#);
        let state = raft_registry::RegistryState::default();
        let from_hashes = commands(&parse(hashed.as_bytes()).expect("valid"), &state, 1);
        let from_keys = commands(&parse(plain.as_bytes()).expect("valid"), &state, 1);
        assert_eq!(from_hashes, from_keys);
        assert!(
            matches!(&from_hashes[0], Command::SetAdminKeyHash { hash } if *hash == key_hash(admin)),
            "{from_hashes:?}"
        );
    }

    // Goal: the registry written in the phext form reads back to the same tenants (hashes,
    // tiers, quotas, limits, state, metadata), and applying it to that registry changes nothing.
    #[test]
    fn phext_form_round_trips() {
        let mut state = raft_registry::RegistryState::default();
        let mut pro = TenantRecord::new(
            "will".into(),
            Tier::Pro,
            key_hash("pmb-v1-00000000000000000000000000000010"),
            7,
        );
        pro.admin_email = Some("will@example.com".into());
        pro.daily_limit = 12_345;
        let mut off = TenantRecord::new(
            "off".into(),
            Tier::Free,
            key_hash("pmb-v1-00000000000000000000000000000011"),
            8,
        );
        off.enabled = false;
        let admin = Command::SetAdminKeyHash { hash: key_hash("sqa-admin") };
        for c in [admin, Command::AddTenant(pro), Command::AddTenant(off)] {
            raft_registry::command::apply(&mut state, c).expect("applies");
        }
        let file = from_registry(&state);
        let bytes = phext::write(&file);
        assert!(!String::from_utf8_lossy(&bytes).contains("pmb-v1-"), "no key in the file");
        let read = parse(&bytes).expect("the written file reads back");
        assert_eq!(read, file);
        assert_eq!(read.tenants.len(), 2);
        assert!(commands(&read, &state, 99).is_empty(), "{:?}", commands(&read, &state, 99));
        // And into an empty registry it adds the same tenants.
        let empty = raft_registry::RegistryState::default();
        let planned = commands(&read, &empty, 99);
        assert_eq!(planned.len(), 3, "{planned:?}");
        let json = br#"{"tenants":[{"id":"will","api_key":"pmb-v1-00000000000000000000000000000010","tier":"pro"}]}"#;
        assert_eq!(
            parse(json).unwrap().tenants[0].key_hash,
            file.tenants.iter().find(|t| t.id == "will").unwrap().key_hash
        );
    }

    // Goal: a phext file with a key instead of a hash, an unknown field, a bad hash or a
    // tenant without an id is refused as a whole, and the error names the scroll.
    #[test]
    fn phext_form_refuses_bad_records() {
        let hash = key_hash("pmb-v1-00000000000000000000000000000010");
        let good = format!("id: a\nkey_hash: {hash}\n");
        assert_eq!(parse(good.as_bytes()).unwrap().tenants.len(), 1);
        for bad in [
            "id: a\napi_key: pmb-v1-00000000000000000000000000000010\n".to_string(),
            format!("id: a\nkey_hash: {hash}\ncolour: red\n"),
            "id: a\nkey_hash: 1234\n".to_string(),
            format!("key_hash: {hash}\n"),
            format!("id: a\nkey_hash: {hash}\nid: b\n"),
            format!("id: a\nkey_hash: {hash}\nenabled: maybe\n"),
            format!("{good}\u{17}{good}"),
        ] {
            let err = parse(bad.as_bytes()).expect_err(&bad);
            assert!(
                matches!(
                    err,
                    FileError::Scroll { .. }
                        | FileError::TenantTwice(_)
                        | FileError::KeyHashMalformed(_)
                ),
                "{err}"
            );
        }
    }
}
