//! The cluster's private CA and the certificates it issues (`sq-cloud certs`).
//!
//! A directory holds `ca.pem` + `ca.key` and one `<role>.pem` + `<role>.key` per process:
//! `node-<id>`, `gateway` or `admin`. Every leaf certificate carries the DNS names
//! [`crate::SERVER_NAME`] and `localhost`, its role in the subject common name, and both the
//! serverAuth and clientAuth usages, since every process is a client and most are servers.
//! Files are written to a temporary name, fsynced and linked into place, never overwritten.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use proto::calendar::{civil_from_days, DAY_S};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::CertificateDer;

use crate::error::{Result, TransportError};

/// The CA certificate's file name in a certs directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA private key's file name in a certs directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// The CA's validity: 20 years. The cluster has no CA rotation yet, so the CA must outlive
/// any deployment; it never leaves the operator's machine.
const CA_VALIDITY_YEARS: i32 = 20;
/// A leaf certificate's validity: 10 years. Leaves can be reissued one process at a time with
/// `sq-cloud certs issue`; a short life would only add outages until rotation is automated.
const LEAF_VALIDITY_YEARS: i32 = 10;
/// Certificates start being valid this many days before issue, so a peer whose clock lags
/// still accepts a freshly issued certificate.
const CLOCK_SKEW_DAYS: i64 = 1;
/// Private keys are readable by their owner only.
const KEY_FILE_MODE: u32 = 0o600;
/// Certificates are public.
const CERT_FILE_MODE: u32 = 0o644;

const CA_COMMON_NAME: &str = "sq-cloud cluster CA";
const ORGANIZATION: &str = "sq-cloud";

/// What a certificate lets its holder be. Parsed from the subject common name on every
/// incoming connection; a name that is not one of these is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// A cluster node, by its (never reused) node id.
    Node(u64),
    /// A stateless gateway.
    Gateway,
    /// An operator tool (`sq-cloud admin`, `bench`, `import`).
    Admin,
}

impl Role {
    /// The subject common name: `sq-node-<id>`, `sq-gateway` or `sq-admin`.
    pub fn common_name(&self) -> String {
        format!("sq-{}", self.file_stem())
    }

    /// The file name stem in a certs directory: `node-<id>`, `gateway` or `admin`.
    pub fn file_stem(&self) -> String {
        match self {
            Role::Node(id) => format!("node-{id}"),
            Role::Gateway => "gateway".to_owned(),
            Role::Admin => "admin".to_owned(),
        }
    }

    /// The inverse of [`Role::common_name`]; `None` for any other name.
    pub fn from_common_name(name: &str) -> Option<Role> {
        match name.strip_prefix("sq-")? {
            "gateway" => Some(Role::Gateway),
            "admin" => Some(Role::Admin),
            rest => {
                let digits = rest.strip_prefix("node-")?;
                let id: u64 = digits.parse().ok()?;
                // Only the canonical spelling ("7", not "+7" or "07"), so one id has one name.
                (id.to_string() == digits).then_some(Role::Node(id))
            }
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file_stem())
    }
}

/// Where `role`'s certificate lives in `dir`.
pub fn cert_path(dir: &Path, role: Role) -> PathBuf {
    dir.join(format!("{}.pem", role.file_stem()))
}

/// Where `role`'s private key lives in `dir`.
pub fn key_path(dir: &Path, role: Role) -> PathBuf {
    dir.join(format!("{}.key", role.file_stem()))
}

/// Creates a new cluster CA in `dir` (created if missing). Refuses if either CA file exists:
/// replacing a CA would cut every issued certificate off the cluster.
pub fn create_ca(dir: &Path) -> Result<()> {
    let (cert_file, key_file) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
    for path in [&cert_file, &key_file] {
        if path.exists() {
            return Err(TransportError::Cert(format!(
                "{} already exists; refusing to replace the cluster CA",
                path.display()
            )));
        }
    }
    fs::create_dir_all(dir).map_err(|e| io_error("create", dir, e))?;
    let key = KeyPair::generate().map_err(cert_error("generate the CA key"))?;
    let cert = ca_params()?.self_signed(&key).map_err(cert_error("self-sign the CA"))?;
    // The key first: a crash between the two leaves no CA certificate without its key.
    write_new(&key_file, &key.serialize_pem(), KEY_FILE_MODE)?;
    write_new(&cert_file, &cert.pem(), CERT_FILE_MODE)?;
    Ok(())
}

/// Issues `role`'s certificate and key from the CA in `dir`. Refuses to overwrite them.
pub fn issue(dir: &Path, role: Role) -> Result<()> {
    let params = leaf_params(&role.common_name())?;
    sign_and_write(dir, params, &cert_path(dir, role), &key_path(dir, role))
}

/// The common name of the public HTTPS certificate. It names no [`Role`], and the certificate
/// lacks clientAuth and the [`crate::SERVER_NAME`] DNS name, so it can neither join the
/// cluster as a client nor pass for a node.
const HTTPS_COMMON_NAME: &str = "sq-cloud public https";

/// Issues the gateway's public HTTPS certificate (`dir/<name>.pem` + `.key`), signed by the
/// cluster CA so local tools can trust `ca.pem`; for `sq-cloud dev --tls`. Valid for
/// `localhost`, `127.0.0.1` and `::1`. Keeps an existing pair, so a restart reuses it.
pub fn issue_https(dir: &Path, name: &str) -> Result<()> {
    check_file_stem(name)?;
    let (cert_file, key_file) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    if cert_file.exists() && key_file.exists() {
        return Ok(());
    }
    let names = ["localhost", "127.0.0.1", "::1"].map(str::to_owned).to_vec();
    issue_https_for(dir, name, &names)
}

/// The file stem of the public HTTPS certificate `sq-cloud certs issue --https` writes.
pub const HTTPS_FILE_STEM: &str = "https";

/// The most subject alternative names one HTTPS certificate carries.
const HTTPS_NAMES_MAX: usize = 100;

fn check_file_stem(name: &str) -> Result<()> {
    let plain = !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !plain {
        return Err(TransportError::Cert(format!("{name:?} is not a plain file name")));
    }
    Ok(())
}

/// Whether `name` is an IP address or a DNS name (letters, digits, `-`, dots; a leading `*.`
/// for a wildcard), as a certificate's subject alternative name.
fn valid_https_name(name: &str) -> bool {
    if name.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let host = name.strip_prefix("*.").unwrap_or(name);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Issues a public HTTPS certificate for the gateway (`dir/<file_stem>.pem` + `.key`), signed by
/// the cluster CA, valid for `names`: DNS names and IP addresses, as clients reach the gateway.
/// Refuses to overwrite an existing pair.
pub fn issue_https_for(dir: &Path, file_stem: &str, names: &[String]) -> Result<()> {
    check_file_stem(file_stem)?;
    if names.is_empty() || names.len() > HTTPS_NAMES_MAX {
        return Err(TransportError::Cert(format!(
            "give between 1 and {HTTPS_NAMES_MAX} names (DNS names or IP addresses) for the certificate"
        )));
    }
    if let Some(bad) = names.iter().find(|n| !valid_https_name(n)) {
        return Err(TransportError::Cert(format!(
            "{bad:?} is neither a DNS name nor an IP address"
        )));
    }
    let (cert_file, key_file) =
        (dir.join(format!("{file_stem}.pem")), dir.join(format!("{file_stem}.key")));
    let mut params =
        CertificateParams::new(names.to_vec()).map_err(cert_error("HTTPS parameters"))?;
    params.distinguished_name = distinguished_name(HTTPS_COMMON_NAME);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, LEAF_VALIDITY_YEARS)?;
    sign_and_write(dir, params, &cert_file, &key_file)
}

/// Issues a cluster certificate with any common name: tests use it for names that are no role.
#[cfg(test)]
pub(crate) fn issue_named(
    dir: &Path,
    common_name: &str,
    cert_file: &Path,
    key_file: &Path,
) -> Result<()> {
    sign_and_write(dir, leaf_params(common_name)?, cert_file, key_file)
}

/// Signs `params` with a fresh key by the CA in `dir`, and writes both files (never over
/// existing ones).
fn sign_and_write(
    dir: &Path,
    params: CertificateParams,
    cert_file: &Path,
    key_file: &Path,
) -> Result<()> {
    let ca_pem = read(&dir.join(CA_CERT_FILE))?;
    let ca_key =
        KeyPair::from_pem(&read(&dir.join(CA_KEY_FILE))?).map_err(cert_error("parse ca.key"))?;
    // rcgen signs with an issuer `Certificate`; rebuilding it from the stored CA keeps the
    // stored subject and key identifier, which is all a signature refers to.
    let issuer = CertificateParams::from_ca_cert_pem(&ca_pem)
        .map_err(cert_error("parse ca.pem"))?
        .self_signed(&ca_key)
        .map_err(cert_error("load the CA"))?;
    let key = KeyPair::generate().map_err(cert_error("generate a key"))?;
    let cert =
        params.signed_by(&key, &issuer, &ca_key).map_err(cert_error("sign the certificate"))?;
    write_new(key_file, &key.serialize_pem(), KEY_FILE_MODE)?;
    write_new(cert_file, &cert.pem(), CERT_FILE_MODE)?;
    Ok(())
}

/// What a process presents and trusts: the cluster CA, its own certificate and its key.
/// Built only through [`Identity::load`] or [`Identity::from_pem`], which check all three parse
/// and that the certificate names a role.
#[derive(Clone)]
pub struct Identity {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
    role: Role,
}

impl Identity {
    /// Loads `role`'s identity from a certs directory, and checks the certificate is `role`'s.
    pub fn load(dir: &Path, role: Role) -> Result<Identity> {
        let identity = Identity::from_pem(
            read(&dir.join(CA_CERT_FILE))?,
            read(&cert_path(dir, role))?,
            read(&key_path(dir, role))?,
        )?;
        if identity.role != role {
            return Err(TransportError::Cert(format!(
                "{} is {}'s certificate, not {role}'s",
                cert_path(dir, role).display(),
                identity.role
            )));
        }
        Ok(identity)
    }

    /// Builds an identity from PEM text (e.g. from a secret store).
    pub fn from_pem(ca_pem: String, cert_pem: String, key_pem: String) -> Result<Identity> {
        crate::tls::parse_certs(&ca_pem)?;
        crate::tls::parse_key(&key_pem)?;
        let leaf = crate::tls::parse_certs(&cert_pem)?;
        let role = role_of(&leaf[0])?;
        Ok(Identity { ca_pem, cert_pem, key_pem, role })
    }

    /// The cluster CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// This process's certificate (chain), PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// This process's private key, PEM.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The role the certificate names.
    pub fn role(&self) -> Role {
        self.role
    }
}

impl fmt::Debug for Identity {
    // Never print the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("role", &self.role).finish_non_exhaustive()
    }
}

/// The role named by a certificate's subject common name.
pub(crate) fn role_of(cert: &CertificateDer<'_>) -> Result<Role> {
    // rcgen's CA parser reads any certificate's subject; we only use the name from it.
    let params =
        CertificateParams::from_ca_cert_der(cert).map_err(cert_error("parse a certificate"))?;
    let name = match params.distinguished_name.get(&DnType::CommonName) {
        Some(DnValue::Utf8String(s)) => s.clone(),
        Some(DnValue::PrintableString(s)) => s.as_str().to_owned(),
        Some(DnValue::Ia5String(s)) => s.as_str().to_owned(),
        _ => {
            return Err(TransportError::Cert("certificate has no readable common name".to_owned()))
        }
    };
    Role::from_common_name(&name).ok_or_else(|| {
        TransportError::Cert(format!("certificate common name {name:?} names no role"))
    })
}

fn ca_params() -> Result<CertificateParams> {
    let mut params =
        CertificateParams::new(Vec::<String>::new()).map_err(cert_error("CA parameters"))?;
    params.distinguished_name = distinguished_name(CA_COMMON_NAME);
    // No intermediates: the CA signs leaves directly.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut params, CA_VALIDITY_YEARS)?;
    Ok(params)
}

fn leaf_params(common_name: &str) -> Result<CertificateParams> {
    let names = vec![crate::SERVER_NAME.to_owned(), "localhost".to_owned()];
    let mut params = CertificateParams::new(names).map_err(cert_error("certificate parameters"))?;
    params.distinguished_name = distinguished_name(common_name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, LEAF_VALIDITY_YEARS)?;
    Ok(params)
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, ORGANIZATION);
    name.push(DnType::CommonName, common_name);
    name
}

/// Valid from [`CLOCK_SKEW_DAYS`] ago until `years` later, in whole UTC days.
fn set_validity(params: &mut CertificateParams, years: i32) -> Result<()> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| TransportError::Cert("the system clock is before 1970".to_owned()))?;
    let days = i64::try_from(now.as_secs() / DAY_S).unwrap_or(i64::MAX) - CLOCK_SKEW_DAYS;
    let (year, month, day) = civil_from_days(days);
    params.not_before = rcgen::date_time_ymd(year, month, day);
    // Day 28 at most: 29 February plus whole years may not exist.
    params.not_after = rcgen::date_time_ymd(year + years, month, day.min(28));
    Ok(())
}

/// Writes `contents` to `path` with `mode`, atomically and only if `path` does not exist:
/// a temporary file is written and fsynced, then hard-linked to `path` (which fails if it
/// exists), and the directory is fsynced.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io_error("create", &tmp, e))?;
    // `mode` applies only to a new file; a leftover temporary file keeps its old bits.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| io_error("chmod", &tmp, e))?;
    file.write_all(contents.as_bytes()).map_err(|e| io_error("write", &tmp, e))?;
    file.sync_all().map_err(|e| io_error("fsync", &tmp, e))?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    linked.map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => TransportError::Cert(format!(
            "{} already exists; refusing to overwrite it",
            path.display()
        )),
        _ => io_error("link", path, e),
    })?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error("fsync", dir, e))
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|e| io_error("read", path, e))
}

fn io_error(action: &str, path: &Path, error: std::io::Error) -> TransportError {
    TransportError::Cert(format!("{action} {}: {error}", path.display()))
}

fn cert_error(action: &'static str) -> impl Fn(rcgen::Error) -> TransportError {
    move |e| TransportError::Cert(format!("{action}: {e}"))
}
