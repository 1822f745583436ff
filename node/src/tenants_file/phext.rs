//! The tenants file as a phext: the auth registry as the ranch mesh keeps it, one scroll per
//! tenant, each scroll a few `field: value` lines. It holds key hashes only, never keys: a file
//! that can be copied around the mesh must not let its reader act as a tenant.
//!
//! ```text
//! id: will
//! key_hash: 3f1c…(64 hex digits, SHA-256 of the key)
//! tier: pro
//! quota_mb: 250
//! daily_limit: 100000
//! enabled: true
//! admin_email: will@example.com
//! ```
//!
//! A scroll holding `admin_key_hash` and no `id` sets the admin key. Lines starting with `#` and
//! blank lines are skipped, so a scroll of comments only is no record. Which coordinate a record
//! sits at does not matter; [`write`] puts them one after another from the origin.

use std::collections::BTreeMap;

use proto::doc::{write_canonical, Doc};
use proto::Coordinate;

use super::{FileError, FileTenant, ScrollProblem, TenantsFile};

/// The fields a tenant's scroll may hold.
const TENANT_FIELDS: [&str; 8] = [
    "id",
    "key_hash",
    "tier",
    "quota_mb",
    "daily_limit",
    "enabled",
    "admin_email",
    "created_at_ms",
];

/// The first scroll [`write`] emits: what the file is, for a person opening it.
const HEADER: &str = "# sq-cloud tenants registry: one scroll per tenant, key hashes only (SHA-256 of each key, never the key)";

/// Reads the phext form. Any bad record refuses the whole file, naming the record's coordinate.
pub fn parse(bytes: &[u8]) -> Result<TenantsFile, FileError> {
    let doc = Doc::parse(bytes)?;
    let mut file = TenantsFile { admin_key_hash: None, tenants: Vec::new() };
    for (c, text) in doc.iter() {
        let at = |problem| FileError::Scroll { at: *c, problem };
        let fields = fields(text).map_err(at)?;
        if fields.is_empty() {
            continue;
        }
        if fields.contains_key("admin_key_hash") {
            if fields.len() > 1 {
                return Err(at(ScrollProblem::AdminKeyHashNotAlone));
            }
            if file.admin_key_hash.is_some() {
                return Err(at(ScrollProblem::AdminKeyHashTwice));
            }
            file.admin_key_hash = Some(fields["admin_key_hash"].to_string());
            continue;
        }
        file.tenants.push(tenant(&fields).map_err(at)?);
    }
    Ok(file)
}

/// The `field: value` lines of one scroll; a field named twice is an error.
fn fields(text: &str) -> Result<BTreeMap<&str, &str>, ScrollProblem> {
    let mut out = BTreeMap::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (name, value) =
            line.split_once(':').ok_or_else(|| ScrollProblem::NotAField(line.to_string()))?;
        let (name, value) = (name.trim(), value.trim());
        if name == "api_key" {
            return Err(ScrollProblem::KeyNotHash);
        }
        if name != "admin_key_hash" && !TENANT_FIELDS.contains(&name) {
            return Err(ScrollProblem::UnknownField(name.to_string()));
        }
        if out.insert(name, value).is_some() {
            return Err(ScrollProblem::FieldTwice(name.to_string()));
        }
    }
    Ok(out)
}

fn tenant(fields: &BTreeMap<&str, &str>) -> Result<FileTenant, ScrollProblem> {
    let text = |name: &str| fields.get(name).map(|v| v.to_string());
    let number = |field: &'static str| -> Result<Option<u64>, ScrollProblem> {
        fields
            .get(field)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| ScrollProblem::NotANumber { field, value: v.to_string() })
            })
            .transpose()
    };
    let enabled = match fields.get("enabled").copied() {
        None | Some("true") => true,
        Some("false") => false,
        Some(other) => return Err(ScrollProblem::NotABool(other.to_string())),
    };
    Ok(FileTenant {
        id: text("id").ok_or(ScrollProblem::FieldMissing("an id"))?,
        key_hash: text("key_hash").ok_or(ScrollProblem::FieldMissing("a key_hash"))?,
        tier: text("tier"),
        quota_mb: number("quota_mb")?,
        daily_limit: number("daily_limit")?,
        enabled,
        admin_email: text("admin_email"),
        created_at_ms: number("created_at_ms")?,
    })
}

/// Writes the phext form: a header scroll at the origin, then one scroll per tenant.
pub fn write(file: &TenantsFile) -> Vec<u8> {
    let mut header = format!("{HEADER}\n");
    if let Some(hash) = &file.admin_key_hash {
        // The admin record is a scroll of its own; the header comment stays with it.
        header.push_str(&format!("admin_key_hash: {hash}\n"));
    }
    let mut scrolls = vec![header];
    for t in &file.tenants {
        let mut s = format!("id: {}\nkey_hash: {}\n", t.id, t.key_hash);
        if let Some(tier) = &t.tier {
            s.push_str(&format!("tier: {tier}\n"));
        }
        for (name, value) in [
            ("quota_mb", t.quota_mb),
            ("daily_limit", t.daily_limit),
            ("created_at_ms", t.created_at_ms),
        ] {
            if let Some(v) = value {
                s.push_str(&format!("{name}: {v}\n"));
            }
        }
        s.push_str(&format!("enabled: {}\n", t.enabled));
        if let Some(email) = &t.admin_email {
            s.push_str(&format!("admin_email: {email}\n"));
        }
        scrolls.push(s);
    }
    let coords: Vec<Coordinate> = (0..scrolls.len()).map(nth_scroll).collect();
    let mut out = Vec::new();
    write_canonical(coords.iter().zip(scrolls.iter().map(String::as_str)), &mut out);
    out
}

/// The n-th scroll from the origin, counting in base 999 from the scroll up, so that every
/// coordinate stays in the range SQ and libphext can read back.
fn nth_scroll(n: usize) -> Coordinate {
    const BASE: usize = proto::coord::SQ_COMPONENT_MAX as usize;
    let mut parts = [1u32; proto::coord::DIMENSIONS];
    let mut rest = n;
    for part in parts.iter_mut().rev() {
        *part = (rest % BASE) as u32 + 1;
        rest /= BASE;
    }
    assert!(rest == 0, "more tenants than a phext can hold");
    Coordinate::from_components(parts).expect("components between 1 and 999")
}
