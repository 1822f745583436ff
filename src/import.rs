//! `sq-cloud import --tenant ID DIR`: brings a single-tenant SQ data directory (`*.phext` files)
//! into a tenant, through the public API with the tenant's key.
//!
//! - Every file is checked before anything is sent: its stem must be a valid phext name and its
//!   bytes valid phext (UTF-8, coordinates in range, scrolls under the request body limit). One
//!   bad file stops the import with its name, and nothing of any file has been written.
//! - A document whose checksum already matches is skipped; otherwise only the scrolls that differ
//!   are written (`update`), and scrolls the tenant holds but the file lacks are emptied
//!   (`delete`), so the tenant's document ends byte for byte equal to the file. Running the
//!   import again changes nothing: it is idempotent, and a run cut short is finished by the next.
//! - Each document's `checksum` is compared with the local canonical bytes' after its writes.
//!
//! Keys are stored only as hashes, so the import cannot look a tenant's key up: it takes `--key`
//! (with `--dev`, the demo tenant's key is known from dev.json).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use proto::{Coordinate, Doc, PhextName};

use crate::tooling::{encode_query_value, http_client, GatewayFlags, Target};

/// Writes in flight at once: enough to share the node's fsyncs (group commit), few enough not to
/// trip the tenant's per-second rate limit for long.
const IMPORT_CONNECTIONS: usize = 4;

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The largest file imported, in bytes: the largest quota a tier gives by default.
const FILE_BYTES_MAX: u64 = 1 << 30;

/// How many times one write is retried after a 429 or 503 before the import stops.
const RETRIES_MAX: u32 = 100;

/// The longest `Retry-After` waited for; a longer one (a daily limit) stops the import.
const RETRY_AFTER_S_MAX: u64 = 30;

/// The pause before retrying a 503 that names no time.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// `sq-cloud import` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ImportConfig {
    /// The tenant to import into.
    #[arg(long)]
    pub tenant: String,
    /// An SQ data directory: its `*.phext` files become phexts named by their file stems.
    pub dir: PathBuf,
    /// The tenant's key (with --dev, the demo tenant's key is known).
    #[arg(long)]
    pub key: Option<String>,
    #[command(flatten)]
    pub gateway: GatewayFlags,
}

/// One checked file.
struct Source {
    path: PathBuf,
    name: PhextName,
    scrolls: usize,
}

/// What was done, for the closing line.
#[derive(Default)]
struct Totals {
    imported: usize,
    unchanged: usize,
    written: usize,
    emptied: usize,
}

pub fn run(config: ImportConfig) -> anyhow::Result<()> {
    if !proto::auth::valid_tenant_id(&config.tenant) {
        bail!("{:?} is not a tenant id: [a-z0-9][a-z0-9-]{{0,62}}", config.tenant);
    }
    let target = config.gateway.target()?;
    let key = tenant_key(&config, &target)?;
    let sources = check_dir(&config.dir)?;
    let http = http_client(target.ca_pem()?.as_deref(), REQUEST_TIMEOUT)?;
    check_tenant(&config.tenant, &target)?;
    let api = Api { http, base: target.api(), auth: format!("Bearer {key}") };
    let bar = ProgressBar::new(sources.iter().map(|s| s.scrolls as u64).sum());
    if let Ok(style) = ProgressStyle::with_template("{msg:>24} [{bar:40}] {pos}/{len} scrolls") {
        bar.set_style(style.progress_chars("=> "));
    }
    let mut totals = Totals::default();
    for source in &sources {
        bar.set_message(source.name.to_string());
        import_one(&api, source, &bar, &mut totals)
            .with_context(|| format!("importing {}", source.path.display()))?;
    }
    bar.finish_and_clear();
    println!(
        "imported {} phexts into tenant {} ({} unchanged): {} scrolls written, {} emptied; every checksum verified",
        totals.imported, config.tenant, totals.unchanged, totals.written, totals.emptied
    );
    Ok(())
}

fn tenant_key(config: &ImportConfig, target: &Target) -> anyhow::Result<String> {
    if let Some(k) = &config.key {
        return Ok(k.clone());
    }
    match &target.demo {
        Some((tenant, key)) if *tenant == config.tenant => Ok(key.clone()),
        _ => bail!("give the tenant's key with --key: keys are stored only as hashes, so they cannot be looked up"),
    }
}

/// With an admin key at hand, checks that the tenant exists and is active before writing.
fn check_tenant(tenant: &str, target: &Target) -> anyhow::Result<()> {
    let Some(admin_key) = &target.admin_key else { return Ok(()) };
    let admin = crate::admin_client::AdminClient::new(
        &target.url,
        admin_key,
        target.ca.clone().unwrap_or_default(),
    )?;
    let record = admin
        .get(&format!("/api/v2/admin/tenants/{}", encode_query_value(tenant)))
        .with_context(|| format!("looking up tenant {tenant}"))?;
    if record["status"] != "active" {
        bail!("tenant {tenant} is {}, not active", record["status"]);
    }
    Ok(())
}

/// Lists and checks every `*.phext` file of `dir`, in name order. Any bad file stops it.
fn check_dir(dir: &Path) -> anyhow::Result<Vec<Source>> {
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry.with_context(|| format!("reading {}", dir.display()))?.path();
        if path.extension().is_some_and(|e| e == "phext") && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    if paths.is_empty() {
        bail!("{} holds no *.phext files", dir.display());
    }
    let mut sources = Vec::new();
    for path in paths {
        let (name, doc) = read_source(&path)?;
        sources.push(Source { path, name, scrolls: doc.scroll_count() });
    }
    Ok(sources)
}

/// Reads one file as a phext: its name from the file stem, its document from its bytes.
fn read_source(path: &Path) -> anyhow::Result<(PhextName, Doc)> {
    let shown = path.display();
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .with_context(|| format!("{shown}: the file name is not UTF-8"))?;
    let name = PhextName::parse(stem)
        .map_err(|_| anyhow::anyhow!("{shown}: {stem:?} is not a valid phext name"))?;
    let size = std::fs::metadata(path).with_context(|| format!("reading {shown}"))?.len();
    if size > FILE_BYTES_MAX {
        bail!("{shown}: {size} bytes is over the import limit of {FILE_BYTES_MAX}");
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {shown}"))?;
    let doc = Doc::parse(&bytes).map_err(|e| anyhow::anyhow!("{shown}: not valid phext: {e}"))?;
    if let Some((c, text)) = doc.iter().find(|(_, t)| t.len() > proto::request::BODY_BYTES_MAX) {
        bail!(
            "{shown}: the scroll at {c} holds {} bytes, over the {} a request may carry",
            text.len(),
            proto::request::BODY_BYTES_MAX
        );
    }
    Ok((name, doc))
}

struct Api {
    http: reqwest::blocking::Client,
    base: String,
    auth: String,
}

impl Api {
    /// Sends one request, waiting out short 429s and 503s; anything else but 200 is an error.
    fn call(
        &self,
        method: reqwest::Method,
        route: &str,
        p: &PhextName,
        c: Option<&Coordinate>,
        body: Option<&str>,
    ) -> anyhow::Result<Vec<u8>> {
        let mut url = format!("{}/{route}?p={}", self.base, encode_query_value(p.as_str()));
        if let Some(c) = c {
            url.push_str(&format!("&c={c}"));
        }
        for _ in 0..=RETRIES_MAX {
            let mut request =
                self.http.request(method.clone(), &url).header("authorization", &self.auth);
            if let Some(b) = body {
                request = request.body(b.to_string());
            }
            let response = request.send().with_context(|| format!("{route} {p}"))?;
            let status = response.status().as_u16();
            let retry_after_s = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            let answer = response
                .bytes()
                .with_context(|| format!("{route} {p}: reading the answer"))?
                .to_vec();
            match (status, retry_after_s) {
                (200, _) => return Ok(answer),
                (429 | 503, Some(s)) if s <= RETRY_AFTER_S_MAX => {
                    std::thread::sleep(Duration::from_secs(s))
                }
                (503, None) => std::thread::sleep(RETRY_PAUSE),
                _ => bail!("{route} {p}: {status} {}", String::from_utf8_lossy(&answer).trim()),
            }
        }
        bail!("{route} {p}: still refused after {RETRIES_MAX} retries")
    }
}

/// Makes the tenant's document equal to the file, then checks the checksum.
fn import_one(
    api: &Api,
    source: &Source,
    bar: &ProgressBar,
    totals: &mut Totals,
) -> anyhow::Result<()> {
    // Read again: the file is imported as it is now, and checked again as it is read.
    let (_, local) = read_source(&source.path)?;
    let expected = proto::ops::doc_checksum(&local);
    let p = &source.name;
    if api.call(reqwest::Method::GET, "checksum", p, None, None)? == expected.as_bytes() {
        totals.unchanged += 1;
        bar.inc(local.scroll_count() as u64);
        return Ok(());
    }
    let remote = Doc::parse(&api.call(reqwest::Method::GET, "get", p, None, None)?)
        .context("the tenant's copy is not valid phext")?;
    let mut writes: Vec<(Coordinate, Option<&str>)> = Vec::new();
    for (c, text) in local.iter() {
        if remote.get(c) != text {
            writes.push((*c, Some(text)));
        } else {
            bar.inc(1);
        }
    }
    let extra: Vec<_> =
        remote.iter().filter(|(c, _)| local.get(c).is_empty()).map(|(c, _)| (*c, None)).collect();
    bar.inc_length(extra.len() as u64);
    writes.extend(extra);
    write_all(api, p, &writes, bar)?;
    let got = api.call(reqwest::Method::GET, "checksum", p, None, None)?;
    if got != expected.as_bytes() {
        bail!(
            "checksum after import is {}, the file's is {expected}: was {p} written to meanwhile?",
            String::from_utf8_lossy(&got)
        );
    }
    totals.imported += 1;
    totals.written += writes.iter().filter(|(_, t)| t.is_some()).count();
    totals.emptied += writes.iter().filter(|(_, t)| t.is_none()).count();
    Ok(())
}

/// Sends the writes over [`IMPORT_CONNECTIONS`] threads; the first error stops them all.
fn write_all(
    api: &Api,
    p: &PhextName,
    writes: &[(Coordinate, Option<&str>)],
    bar: &ProgressBar,
) -> anyhow::Result<()> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..IMPORT_CONNECTIONS.min(writes.len()))
            .map(|_| {
                s.spawn(|| -> anyhow::Result<()> {
                    while !failed.load(Ordering::SeqCst) {
                        let Some((c, text)) = writes.get(next.fetch_add(1, Ordering::SeqCst))
                        else {
                            return Ok(());
                        };
                        let result = match text {
                            Some(t) => {
                                api.call(reqwest::Method::POST, "update", p, Some(c), Some(t))
                            }
                            None => api.call(reqwest::Method::GET, "delete", p, Some(c), None),
                        };
                        if let Err(e) = result {
                            failed.store(true, Ordering::SeqCst);
                            return Err(e);
                        }
                        bar.inc(1);
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().map_err(|_| anyhow::anyhow!("an import worker panicked"))?)
    })
}
