//! The bench's three stages: get tenants, write their documents, then load them for the
//! configured time. Every stage that sends requests runs on worker threads, each with its own
//! current-thread runtime and one keep-alive connection.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};

use super::conn::{Conn, Endpoint};
use super::report::{Report, Setup, Tally};
use super::{coordinate, scroll_text, BenchConfig, Op, INSERT_BYTES};
use crate::admin_client::AdminClient;
use crate::tooling::{encode_query_value, Target};

/// A tenant the bench makes gets this daily request limit, so that a long run measures the
/// service rather than the tier's allowance. The per-second burst limit still applies.
const BENCH_DAILY_LIMIT: u64 = 1_000_000_000_000;

/// How long a worker waits after a failed connect, or before retrying a refused write while
/// preparing, so that an outage is not spun on.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// How many times preparing retries one scroll refused with 429 or 503 before giving up.
const PREPARE_RETRIES_MAX: u32 = 300;

/// How often the progress bar is redrawn.
const PROGRESS_TICK: Duration = Duration::from_millis(100);

/// What every worker needs to build its requests.
pub struct Plan {
    endpoint: Endpoint,
    url: String,
    phext: String,
    inserts: String,
    document: Vec<u8>,
}

impl Plan {
    pub fn new(config: &BenchConfig, target: &Target) -> anyhow::Result<Plan> {
        let endpoint = Endpoint::new(&target.url, target.ca_pem()?.as_deref())?;
        let mut doc = proto::Doc::new();
        for i in 0..config.scrolls {
            let c =
                proto::Coordinate::parse(&coordinate(i)).context("bench coordinates are valid")?;
            doc.set(c, scroll_text(i, config.scroll_bytes));
        }
        Ok(Plan {
            endpoint,
            url: target.url.clone(),
            phext: encode_query_value(&config.phext),
            inserts: encode_query_value(&format!("{}-inserts", config.phext)),
            document: doc.to_canonical(),
        })
    }

    fn request(
        &self,
        op: Op,
        scroll: usize,
        update_body: &Bytes,
        insert_body: &Bytes,
    ) -> (hyper::Method, String, Bytes) {
        let (get, post) = (hyper::Method::GET, hyper::Method::POST);
        let p = &self.phext;
        match op {
            Op::Select => {
                (get, format!("/api/v2/select?p={p}&c={}", coordinate(scroll)), Bytes::new())
            }
            Op::Update => (
                post,
                format!("/api/v2/update?p={p}&c={}", coordinate(scroll)),
                update_body.clone(),
            ),
            Op::Insert => (
                post,
                format!("/api/v2/insert?p={}&c={}", self.inserts, coordinate(scroll)),
                insert_body.clone(),
            ),
            Op::Toc => (get, format!("/api/v2/toc?p={p}"), Bytes::new()),
            Op::Get => (get, format!("/api/v2/get?p={p}"), Bytes::new()),
        }
    }
}

/// The tenants under load: their `Authorization` values, and the ids bench made itself.
pub struct Tenants {
    auths: Vec<String>,
    made: Vec<String>,
    admin: Option<AdminClient>,
}

impl Tenants {
    /// The `--key` tenant, or `--tenants` new ones made through the admin API.
    pub fn obtain(config: &BenchConfig, target: &Target) -> anyhow::Result<Tenants> {
        if let Some(key) = &config.key {
            return Ok(Tenants {
                auths: vec![format!("Bearer {key}")],
                made: Vec::new(),
                admin: None,
            });
        }
        let Some(admin_key) = &target.admin_key else {
            bail!("bench makes its own tenants through the admin API: give --admin-key (or --dev DIR), or --key to use one tenant");
        };
        let admin =
            AdminClient::new(&target.url, admin_key, target.ca.clone().unwrap_or_default())?;
        let mut tenants = Tenants { auths: Vec::new(), made: Vec::new(), admin: Some(admin) };
        if let Err(e) = tenants.make(config.tenants) {
            tenants.release(config);
            return Err(e);
        }
        Ok(tenants)
    }

    fn make(&mut self, count: usize) -> anyhow::Result<()> {
        let Some(admin) = &self.admin else { bail!("no admin client") };
        let run_id = format!("{:08x}", rand::random::<u32>());
        let bar = progress(count as u64, "making tenants");
        for i in 0..count {
            let id = format!("bench-{run_id}-{i}");
            let answer = admin
                .post(
                    "/api/v2/admin/tenants/add",
                    &serde_json::json!({"tenant_id": id, "tier": "team"}),
                )
                .with_context(|| format!("making tenant {id}"))?;
            self.made.push(id.clone());
            let key = answer["api_key"].as_str().context("the gateway answered no api_key")?;
            self.auths.push(format!("Bearer {key}"));
            admin.patch(
                &format!("/api/v2/admin/tenants/{id}"),
                &serde_json::json!({"daily_limit": BENCH_DAILY_LIMIT}),
            )?;
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok(())
    }

    /// Archives the tenants bench made (DELETE keeps their data until a purge), unless kept.
    pub fn release(&self, config: &BenchConfig) {
        let Some(admin) = &self.admin else { return };
        if config.keep_tenants {
            eprintln!("kept {} bench tenants: {}", self.made.len(), self.made.join(" "));
            return;
        }
        for id in &self.made {
            if let Err(e) = admin.delete(&format!("/api/v2/admin/tenants/{id}")) {
                eprintln!("could not archive bench tenant {id}: {e:#}");
            }
        }
    }
}

pub(super) fn progress(len: u64, message: &'static str) -> ProgressBar {
    let bar = ProgressBar::new(len).with_message(message);
    if let Ok(style) = ProgressStyle::with_template("{msg:>16} [{bar:40}] {pos}/{len} {per_sec}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Runs `work(worker)` on `n` threads, each inside its own current-thread runtime.
fn on_threads<T, F, Fut>(n: usize, work: F) -> anyhow::Result<Vec<T>>
where
    T: Send,
    F: Fn(usize) -> Fut + Sync,
    Fut: std::future::Future<Output = T>,
{
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|w| {
                let work = &work;
                s.spawn(move || -> anyhow::Result<T> {
                    let runtime =
                        tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                    Ok(runtime.block_on(work(w)))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("a bench worker panicked"))?)
            .collect()
    })
}

/// Writes every tenant's document, scroll by scroll, unless its checksum shows it is there.
pub fn prepare(plan: &Plan, tenants: &Tenants, config: &BenchConfig) -> anyhow::Result<()> {
    let expected = proto::doc::checksum(&plan.document);
    let mut todo = Vec::new();
    let mut checked = on_threads(1, |_| async {
        let mut conn = Conn::open(&plan.endpoint).await?;
        let mut stale = Vec::new();
        for (t, auth) in tenants.auths.iter().enumerate() {
            let answer = conn
                .send(
                    hyper::Method::GET,
                    &format!("/api/v2/checksum?p={}", plan.phext),
                    auth,
                    Bytes::new(),
                )
                .await?;
            if answer.status != 200 {
                bail!(
                    "checksum of the bench document: {} {}",
                    answer.status,
                    String::from_utf8_lossy(&answer.body)
                );
            }
            if answer.body != expected.as_bytes() {
                stale.push(t);
            }
        }
        Ok(stale)
    })?;
    for t in checked.pop().unwrap_or_else(|| Ok(Vec::new()))? {
        todo.extend((0..config.scrolls).map(|i| (t, i)));
    }
    if todo.is_empty() {
        return Ok(());
    }
    let bar = progress(todo.len() as u64, "writing documents");
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let results = on_threads(config.concurrency.min(todo.len()), |_| async {
        let result = prepare_worker(plan, tenants, config, &todo, &next, &bar, &failed).await;
        if result.is_err() {
            failed.store(true, Ordering::SeqCst);
        }
        result
    })?;
    bar.finish_and_clear();
    results.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    Ok(())
}

async fn prepare_worker(
    plan: &Plan,
    tenants: &Tenants,
    config: &BenchConfig,
    todo: &[(usize, usize)],
    next: &AtomicUsize,
    bar: &ProgressBar,
    failed: &AtomicBool,
) -> anyhow::Result<()> {
    let mut conn = Conn::open(&plan.endpoint).await?;
    while !failed.load(Ordering::SeqCst) {
        let Some(&(t, i)) = todo.get(next.fetch_add(1, Ordering::SeqCst)) else { return Ok(()) };
        let path = format!("/api/v2/update?p={}&c={}", plan.phext, coordinate(i));
        let body = Bytes::from(scroll_text(i, config.scroll_bytes));
        let mut attempts = 0;
        loop {
            let answer =
                conn.send(hyper::Method::POST, &path, &tenants.auths[t], body.clone()).await?;
            match answer.status {
                200 => break,
                429 | 503 if attempts < PREPARE_RETRIES_MAX => {
                    attempts += 1;
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                s => bail!(
                    "writing scroll {i} of the bench document: {s} {}",
                    String::from_utf8_lossy(&answer.body)
                ),
            }
        }
        bar.inc(1);
    }
    Ok(())
}

/// Loads the tenants with the mix for the configured time; returns the merged report.
pub fn measure(plan: &Plan, tenants: &Tenants, config: &BenchConfig) -> anyhow::Result<Report> {
    let done = AtomicU64::new(0);
    let seed: u64 = rand::random();
    let bar = ProgressBar::new(config.duration.as_millis() as u64);
    if let Ok(style) = ProgressStyle::with_template("{msg:>16} [{bar:40}] {elapsed}/{duration}") {
        bar.set_style(style.progress_chars("=> "));
    }
    let started = Instant::now();
    let deadline = started + config.duration;
    let (tallies, elapsed) = std::thread::scope(|s| {
        let ticker = s.spawn(|| {
            while Instant::now() < deadline {
                std::thread::sleep(PROGRESS_TICK);
                let secs = started.elapsed().as_secs_f64();
                bar.set_position(started.elapsed().as_millis() as u64);
                bar.set_message(format!("{:.0} req/s", done.load(Ordering::Relaxed) as f64 / secs));
            }
        });
        let tallies = on_threads(config.concurrency, |w| {
            measure_worker(w, seed, plan, tenants, config, deadline, &done)
        });
        let elapsed = started.elapsed();
        let _ = ticker.join();
        (tallies, elapsed)
    });
    bar.finish_and_clear();
    let mut total = Tally::new();
    for t in tallies? {
        total.merge(&t);
    }
    let setup = Setup {
        url: plan.url.clone(),
        tenants: tenants.auths.len(),
        concurrency: config.concurrency,
        duration_s: config.duration.as_secs_f64(),
        mix: config.mix.to_string(),
        scrolls: config.scrolls,
        scroll_bytes: config.scroll_bytes,
        document_bytes: plan.document.len() as u64,
    };
    Ok(total.report(setup, elapsed))
}

async fn measure_worker(
    w: usize,
    seed: u64,
    plan: &Plan,
    tenants: &Tenants,
    config: &BenchConfig,
    deadline: Instant,
    done: &AtomicU64,
) -> Tally {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(w as u64));
    let mut tally = Tally::new();
    let mut conn: Option<Conn> = None;
    // Each update carries new text: the store answers an update to the text a scroll already
    // holds without logging it, which would measure no write at all.
    let mut update_text = vec![b'a' + (w % 26) as u8; config.scroll_bytes];
    let mut updates = 0u64;
    let insert_body = Bytes::from(vec![b'i'; INSERT_BYTES]);
    let total = config.mix.total();
    while Instant::now() < deadline {
        let op = config.mix.pick(rng.gen_range(0..total));
        let auth = &tenants.auths[rng.gen_range(0..tenants.auths.len())];
        let update_body = match op {
            Op::Update => {
                updates += 1;
                stamp(&mut update_text, w, updates)
            }
            _ => Bytes::new(),
        };
        let (method, path, body) =
            plan.request(op, rng.gen_range(0..config.scrolls), &update_body, &insert_body);
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::open(&plan.endpoint).await {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    tally.error(op, "connect".into());
                    tokio::time::sleep(RETRY_PAUSE).await;
                    continue;
                }
            },
        };
        let sent = Instant::now();
        match c.send(method, &path, auth, body).await {
            Ok(a) if (200..300).contains(&a.status) => tally.ok(op, sent.elapsed()),
            Ok(a) => tally.error(op, a.status.to_string()),
            Err(_) => {
                tally.error(op, "io".into());
                conn = None;
            }
        }
        done.fetch_add(1, Ordering::Relaxed);
    }
    tally
}

/// `text` with worker and counter written over its start (as far as it reaches): text no scroll
/// holds yet.
fn stamp(text: &mut [u8], worker: usize, n: u64) -> Bytes {
    let mark = format!("{worker}.{n} ");
    let len = mark.len().min(text.len());
    text[..len].copy_from_slice(&mark.as_bytes()[..len]);
    Bytes::copy_from_slice(text)
}
