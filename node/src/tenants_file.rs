//! The declarative tenants file (the seeds' `tenants.json` shape), applied to the registry and
//! re-applied within [`POLL_INTERVAL`] of any change.
//!
//! `{"admin_key"? | "admin_key_hash"?: "...", "tenants": [{"id", "api_key" | "api_key_hash",
//! "quota_mb"?, "enabled"?, "tier"?}]}`. Keys are hashed as soon as the file is read; only hashes
//! reach the registry. The `_hash` forms (SHA-256 of the key, 64 lowercase hex digits, as
//! `sha256sum` prints it) keep plaintext keys off the nodes altogether. A malformed file
//! is refused as a whole with one clear log line, and the registry is left as it was. Tenants
//! missing from the file are left alone: removing a tenant is an explicit admin action.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proto::auth::{key_hash, valid_tenant_id};
use proto::cluster::MIB;
use raft_registry::{Command, TenantRecord, Tier};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::service::Service;

/// How often the file is checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The largest tenants file read, in bytes.
const FILE_BYTES_MAX: u64 = 64 * 1024 * 1024;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantsFile {
    pub admin_key: Option<String>,
    /// The admin key's SHA-256 in hex, instead of `admin_key`.
    #[serde(default)]
    pub admin_key_hash: Option<String>,
    pub tenants: Vec<FileTenant>,
    /// Accepted for compatibility with the seeds' shape; the file is always watched.
    #[serde(default)]
    pub reload_on_change: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTenant {
    pub id: String,
    #[serde(default)]
    pub api_key: Option<String>,
    /// The key's SHA-256 in hex, instead of `api_key`.
    #[serde(default)]
    pub api_key_hash: Option<String>,
    pub quota_mb: Option<u64>,
    #[serde(default = "yes")]
    pub enabled: bool,
    pub tier: Option<String>,
    /// Accepted for compatibility with the seeds' shape; data lives where the owner keeps it.
    #[serde(default)]
    pub data_dir: Option<String>,
}

fn yes() -> bool {
    true
}

/// Length of a key hash in hex digits (SHA-256).
const KEY_HASH_HEX_LEN: usize = 64;

/// Whether `h` has the shape of a key hash: 64 lowercase hex digits.
fn is_key_hash(h: &str) -> bool {
    h.len() == KEY_HASH_HEX_LEN
        && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl TenantsFile {
    /// The admin key's hash, from whichever form the file uses.
    pub fn admin_hash(&self) -> Option<String> {
        self.admin_key_hash.clone().or_else(|| self.admin_key.as_deref().map(key_hash))
    }
}

impl FileTenant {
    /// The tenant key's hash, from whichever form the file uses (checked by [`parse`]).
    pub fn key_hash(&self) -> String {
        match (&self.api_key_hash, &self.api_key) {
            (Some(h), _) => h.clone(),
            (None, Some(k)) => key_hash(k),
            (None, None) => String::new(),
        }
    }
}

/// Parses and checks the whole file; any error refuses all of it.
pub fn parse(bytes: &[u8]) -> Result<TenantsFile, String> {
    let file: TenantsFile =
        serde_json::from_slice(bytes).map_err(|e| format!("not a tenants file: {e}"))?;
    match (&file.admin_key, &file.admin_key_hash) {
        (Some(_), Some(_)) => return Err("give admin_key or admin_key_hash, not both".into()),
        (None, Some(h)) if !is_key_hash(h) => {
            return Err("admin_key_hash must be 64 lowercase hex digits (SHA-256 of the key)".into())
        }
        _ => {}
    }
    let mut seen = std::collections::HashSet::new();
    for t in &file.tenants {
        if !valid_tenant_id(&t.id) {
            return Err(format!("tenant id {:?} must match [a-z0-9][a-z0-9-]{{0,62}}", t.id));
        }
        if !seen.insert(&t.id) {
            return Err(format!("tenant {} is listed twice", t.id));
        }
        match (&t.api_key, &t.api_key_hash) {
            (Some(_), Some(_)) => {
                return Err(format!("tenant {}: give api_key or api_key_hash, not both", t.id))
            }
            (None, None) => return Err(format!("tenant {}: give api_key or api_key_hash", t.id)),
            (Some(k), None) if k.len() < 16 => {
                return Err(format!("tenant {}: api_key is too short to be a key", t.id));
            }
            (None, Some(h)) if !is_key_hash(h) => {
                return Err(format!(
                    "tenant {}: api_key_hash must be 64 lowercase hex digits (SHA-256 of the key)",
                    t.id
                ));
            }
            _ => {}
        }
        if let Some(tier) = &t.tier {
            Tier::parse(tier).ok_or_else(|| format!("tenant {}: unknown tier {tier:?}", t.id))?;
        }
    }
    Ok(file)
}

/// The commands that make the registry match the file.
pub fn commands(
    file: &TenantsFile,
    state: &raft_registry::RegistryState,
    now_ms: u64,
) -> Vec<Command> {
    let mut out = Vec::new();
    if let Some(hash) = file.admin_hash() {
        if state.admin_key_hash() != Some(hash.as_str()) {
            out.push(Command::SetAdminKeyHash { hash });
        }
    }
    for t in &file.tenants {
        let hash = t.key_hash();
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
                    daily_limit: tier.default_daily_limit(),
                    key_hashes: vec![hash],
                    enabled: t.enabled,
                    archived: false,
                    created_at_ms: now_ms,
                    admin_email: None,
                }));
            }
            Some(r) => {
                if r.key_hashes != [hash.clone()] {
                    out.push(Command::RotateKey { id: t.id.clone(), new_hash: hash });
                }
                let quota_changed = quota_bytes.is_some_and(|q| q != r.quota_bytes);
                let tier_changed = tier.is_some_and(|x| x != r.tier);
                if quota_changed || tier_changed || r.enabled != t.enabled {
                    out.push(Command::UpdateTenant {
                        id: t.id.clone(),
                        tier: tier.filter(|_| tier_changed),
                        quota_bytes: quota_bytes.filter(|_| quota_changed),
                        daily_limit: None,
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
    let mut applied: Option<Vec<u8>> = None;
    loop {
        if svc.registry.status().leader == Some(svc.id) {
            match read(&path).await {
                Ok(bytes) if applied.as_ref() != Some(&bytes) => match apply(&svc, &bytes).await {
                    Ok(n) => {
                        tracing::info!(path = %path.display(), changes = n, "tenants file applied");
                        applied = Some(bytes);
                    }
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "tenants file refused; registry unchanged");
                        applied = Some(bytes);
                    }
                },
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read tenants file")
                }
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

async fn read(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let meta = tokio::fs::metadata(path).await.map_err(|e| e.to_string())?;
    if meta.len() > FILE_BYTES_MAX {
        return Err(format!("file is larger than {FILE_BYTES_MAX} bytes"));
    }
    tokio::fs::read(path).await.map_err(|e| e.to_string())
}

async fn apply(svc: &Service, bytes: &[u8]) -> Result<usize, String> {
    let file = parse(bytes)?;
    let commands = commands(&file, &svc.registry.state(), svc.wall_ms());
    let n = commands.len();
    for c in commands {
        svc.registry.write(c).await.map_err(|e| e.to_string())?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
