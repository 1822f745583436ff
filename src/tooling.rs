//! What `bench` and `import` share: where the gateway is (flags or a dev cluster's `dev.json`),
//! and how a phext name travels in a query string.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// The environment variable naming the CA certificate (PEM) that `admin`, `bench` and `import`
/// trust for HTTPS when `--ca` is not given (and `--dev` brings none).
pub const CA_ENV: &str = "SQ_CLOUD_CA";

/// Adds what to do when the gateway's certificate was signed by a CA the tool does not trust.
pub fn with_tls_hint(e: anyhow::Error) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.contains("UnknownIssuer") || text.contains("unknown issuer") {
        e.context(format!(
            "the gateway's HTTPS certificate is signed by a CA this tool does not trust: give that \
             CA's certificate with --ca FILE or {CA_ENV}=FILE (for `sq-cloud certs`, its ca.pem)"
        ))
    } else {
        e
    }
}

/// Where `bench` and `import` find the gateway: `--dev DIR` or `--url`, with the admin key and
/// CA flags overriding what a dev cluster's dev.json says ([`Target::resolve`]).
#[derive(Debug, Clone, clap::Args)]
pub struct GatewayFlags {
    /// A dev cluster's directory: its dev.json gives the gateway URL, admin key and CA.
    #[arg(long)]
    pub dev: Option<PathBuf>,
    /// The gateway, e.g. https://sq.example.com or http://127.0.0.1:8080.
    #[arg(long)]
    pub url: Option<String>,
    /// The admin key. `bench` makes (and afterwards archives) its tenants with it; `import`
    /// checks with it that the tenant exists and is active before it writes.
    #[arg(long)]
    pub admin_key: Option<String>,
    /// A CA certificate (PEM) to trust for an https:// gateway [env: SQ_CLOUD_CA]
    #[arg(long)]
    pub ca: Option<PathBuf>,
}

impl GatewayFlags {
    pub fn target(&self) -> anyhow::Result<Target> {
        Target::resolve(
            self.dev.as_deref(),
            self.url.clone(),
            self.admin_key.clone(),
            self.ca.clone(),
        )
    }
}

/// The gateway a tool talks to, and the keys it was given.
#[derive(Debug, Clone)]
pub struct Target {
    /// Scheme, host and port, e.g. `http://127.0.0.1:8080`; no trailing slash, no `/api/v2`.
    pub url: String,
    pub admin_key: Option<String>,
    /// A dev cluster's demo tenant and its key, when the target came from `--dev`.
    pub demo: Option<(String, String)>,
    /// A CA certificate (PEM) to trust for HTTPS, e.g. the dev cluster's `certs/ca.pem`.
    pub ca: Option<PathBuf>,
}

impl Target {
    /// From `--dev DIR` (its dev.json) or `--url`, with flags overriding what dev.json says.
    pub fn resolve(
        dev: Option<&Path>,
        url: Option<String>,
        admin_key: Option<String>,
        ca: Option<PathBuf>,
    ) -> anyhow::Result<Target> {
        let mut target = match dev {
            Some(dir) => Target::from_dev(dir)?,
            None => Target { url: String::new(), admin_key: None, demo: None, ca: None },
        };
        if let Some(u) = url {
            target.url = u;
        }
        if target.url.is_empty() {
            bail!("say where the gateway is: --url URL or --dev DIR");
        }
        target.url = normalise_url(&target.url)?;
        target.admin_key = admin_key.or(target.admin_key);
        let env_ca = std::env::var_os(CA_ENV).filter(|v| !v.is_empty()).map(PathBuf::from);
        target.ca = ca.or(target.ca).or(env_ca);
        Ok(target)
    }

    fn from_dev(dir: &Path) -> anyhow::Result<Target> {
        let path = dir.join("dev.json");
        let bytes = std::fs::read(&path).with_context(|| {
            format!(
                "reading {} (is `sq-cloud dev --data {}` running?)",
                path.display(),
                dir.display()
            )
        })?;
        let dev: crate::dev::DevJson = serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing {}", path.display()))?;
        let ca = dir.join("certs").join(transport::certs::CA_CERT_FILE);
        Ok(Target {
            url: dev.gateway_url,
            admin_key: Some(dev.admin_key),
            demo: Some((dev.demo_tenant, dev.demo_key)),
            ca: ca.exists().then_some(ca),
        })
    }

    /// The `/api/v2` base.
    pub fn api(&self) -> String {
        format!("{}/api/v2", self.url)
    }

    /// The CA certificate as PEM, if one was given; an unreadable file is an error.
    pub fn ca_pem(&self) -> anyhow::Result<Option<Vec<u8>>> {
        match &self.ca {
            None => Ok(None),
            Some(p) => std::fs::read(p)
                .map(Some)
                .with_context(|| format!("reading the CA certificate {}", p.display())),
        }
    }
}

/// Accepts `http(s)://host:port`, with or without a trailing `/` or `/api/v2`.
fn normalise_url(raw: &str) -> anyhow::Result<String> {
    let url = raw.trim().trim_end_matches('/');
    let url = url.strip_suffix("/api/v2").unwrap_or(url);
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        bail!("{raw:?} is not an http:// or https:// URL");
    }
    Ok(url.to_string())
}

/// Percent-encodes a query-string value: everything but RFC 3986's unreserved characters.
pub fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A reqwest client for setup work (admin calls, import), trusting `ca` for HTTPS if given.
pub fn http_client(
    ca_pem: Option<&[u8]>,
    timeout: std::time::Duration,
) -> anyhow::Result<reqwest::blocking::Client> {
    let mut builder = reqwest::blocking::Client::builder().timeout(timeout);
    if let Some(pem) = ca_pem {
        builder = builder.add_root_certificate(
            reqwest::Certificate::from_pem(pem).context("the CA certificate is not PEM")?,
        );
    }
    builder.build().context("building the HTTP client")
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: names with reserved characters survive the trip through SQ's query-string decoding.
    #[test]
    fn query_values_round_trip() {
        for name in ["plain", "my notes", "a&b=c", "50%+x", "漢字", "#?"] {
            let encoded = encode_query_value(name);
            let decoded = proto::request::Params::parse(&format!("p={encoded}"));
            assert_eq!(decoded.get("p"), Some(name.as_bytes()), "{name}");
        }
    }

    // Goal: the URL forms an operator might paste all name the same gateway.
    #[test]
    fn urls() {
        for raw in ["http://h:1", "http://h:1/", "http://h:1/api/v2", "http://h:1/api/v2/"] {
            assert_eq!(normalise_url(raw).unwrap(), "http://h:1");
        }
        assert!(normalise_url("h:1").is_err());
    }
}
