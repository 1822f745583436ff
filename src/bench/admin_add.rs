//! `sq-cloud bench --mode admin-add`: how fast the registry grows through a gateway, and what
//! its growth costs.
//!
//! `--concurrency` workers (threads, each with its own keep-alive admin client) add tenants
//! until `--tenants` were added, and the report gives adds per second and latency per band of
//! `--band` adds (the first band against the last shows whether an add slows as the registry
//! grows). Then `--single-adds` adds one at a time: their latency, and how long after each
//! answer its new key works through every gateway (`--probe-gateway`, besides the one added
//! through). With `--dev`, the resident memory of the gateway and of each node is read before
//! and after, per tenant added.
//!
//! The tenants are kept: the point is a large registry. Run it on a throwaway dev cluster.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

use super::BenchConfig;
use crate::admin_client::AdminClient;
use crate::tooling::Target;

/// The most tenants one admin-add run adds (a registry of ten times the product's target).
pub const ADMIN_ADD_TENANTS_MAX: usize = 1_000_000;

/// The most one-at-a-time adds, each followed by key probes.
const SINGLE_ADDS_MAX: usize = 10_000;

/// How long a new key may take to work through every gateway before the probe gives up.
const PROBE_DEADLINE: Duration = Duration::from_secs(10);

/// Pause between two probes of a key that does not work yet.
const PROBE_PAUSE: Duration = Duration::from_millis(2);

/// Tries of one add answered 503 (no registry leader for a moment) before the run fails.
const ADD_RETRIES_MAX: u32 = 50;

/// What one band of adds did.
#[derive(Debug, Serialize)]
pub struct Band {
    /// Tenants added by this run before the band, and after it.
    pub from: usize,
    pub to: usize,
    pub adds_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Resident memory of one process, before and after, and per tenant added.
#[derive(Debug, Serialize)]
pub struct Memory {
    pub process: String,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    pub bytes_per_tenant: f64,
}

#[derive(Debug, Serialize)]
pub struct AdminAddReport {
    pub concurrency: usize,
    pub added: usize,
    pub seconds: f64,
    pub adds_per_s: f64,
    pub bands: Vec<Band>,
    /// The last band's adds per second against the first's (1.0: no slower).
    pub last_band_vs_first: f64,
    pub single_adds: usize,
    pub single_p50_ms: f64,
    pub single_p99_ms: f64,
    pub gateways_probed: usize,
    /// From an add's answer until its key worked through every probed gateway.
    pub key_everywhere_p50_ms: f64,
    pub key_everywhere_max_ms: f64,
    pub memory: Vec<Memory>,
}

/// The admin-add run of `config` against `target`.
pub fn run(config: &BenchConfig, target: &Target) -> anyhow::Result<AdminAddReport> {
    if config.tenants == 0 || config.tenants > ADMIN_ADD_TENANTS_MAX {
        bail!("--tenants must be 1..={ADMIN_ADD_TENANTS_MAX} in admin-add mode");
    }
    if config.band == 0 || config.single_adds > SINGLE_ADDS_MAX {
        bail!("--band must be at least 1 and --single-adds at most {SINGLE_ADDS_MAX}");
    }
    let Some(admin_key) = target.admin_key.clone() else {
        bail!("admin-add needs the admin key: --admin-key or --dev DIR");
    };
    let processes = processes(config)?;
    let rss_before: Vec<u64> = processes.iter().map(|(_, pid)| rss_bytes(*pid)).collect();
    let run_id = format!("{:08x}", rand::random::<u32>());
    let client =
        || AdminClient::new(&target.url, &admin_key, target.ca.clone().unwrap_or_default());

    let (latencies, seconds) = concurrent_adds(config, &run_id, &client)?;
    let bands = bands(&latencies, config.band);
    let last_band_vs_first = match (bands.first(), bands.last()) {
        (Some(f), Some(l)) if f.adds_per_s > 0.0 => l.adds_per_s / f.adds_per_s,
        _ => 1.0,
    };

    let mut gateways = vec![target.url.clone()];
    gateways.extend(config.probe_gateways.iter().cloned());
    let probe = crate::tooling::http_client(target.ca_pem()?.as_deref(), PROBE_DEADLINE)?;
    let admin = client()?;
    let mut single = Vec::with_capacity(config.single_adds);
    let mut everywhere = Vec::with_capacity(config.single_adds);
    for i in 0..config.single_adds {
        let id = format!("aa-{run_id}-s{i:05}");
        let started = Instant::now();
        let key = add(&admin, &id)?;
        single.push(started.elapsed());
        let answered = Instant::now();
        for g in &gateways {
            wait_key_works(&probe, g, &key, answered)?;
        }
        everywhere.push(answered.elapsed());
    }

    let memory = memory_added(&processes, rss_before, config.tenants + config.single_adds);
    Ok(AdminAddReport {
        concurrency: config.concurrency,
        added: config.tenants,
        seconds,
        adds_per_s: config.tenants as f64 / seconds,
        bands,
        last_band_vs_first,
        single_adds: config.single_adds,
        single_p50_ms: percentile_ms(&mut single, 0.50),
        single_p99_ms: percentile_ms(&mut single, 0.99),
        gateways_probed: gateways.len(),
        key_everywhere_p50_ms: percentile_ms(&mut everywhere, 0.50),
        key_everywhere_max_ms: percentile_ms(&mut everywhere, 1.0),
        memory,
    })
}

/// Each process's resident memory now against `rss_before`, and per tenant of the `added`.
fn memory_added(processes: &[(String, u32)], rss_before: Vec<u64>, added: usize) -> Vec<Memory> {
    processes
        .iter()
        .zip(rss_before)
        .map(|((name, pid), before)| {
            let after = rss_bytes(*pid);
            Memory {
                process: name.clone(),
                rss_before_bytes: before,
                rss_after_bytes: after,
                bytes_per_tenant: (after as f64 - before as f64) / added as f64,
            }
        })
        .collect()
}

/// Adds `config.tenants` tenants with `config.concurrency` workers. Returns each add's latency
/// and the time it finished, in the order they finished, and the run's length in seconds.
fn concurrent_adds(
    config: &BenchConfig,
    run_id: &str,
    client: &(dyn Fn() -> anyhow::Result<AdminClient> + Sync),
) -> anyhow::Result<(Vec<(Duration, Duration)>, f64)> {
    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<(Duration, Duration)>> = Mutex::new(Vec::with_capacity(config.tenants));
    let bar = super::workers::progress(config.tenants as u64, "adding tenants");
    let started = Instant::now();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..config.concurrency)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    let admin = client()?;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= config.tenants {
                            return Ok(());
                        }
                        let t0 = Instant::now();
                        add(&admin, &format!("aa-{run_id}-{i:07}"))?;
                        let finished = started.elapsed();
                        // Poisoned only if another worker panicked, which ends the run anyway.
                        done.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((t0.elapsed(), finished));
                        bar.inc(1);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| anyhow::anyhow!("an add worker panicked"))??;
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let mut done = done.into_inner().unwrap_or_else(|p| p.into_inner());
    done.sort_by_key(|(_, finished)| *finished);
    Ok((done, seconds))
}

/// Adds tenant `id` (free tier) and returns its key; a 503 (an election) is tried again.
fn add(admin: &AdminClient, id: &str) -> anyhow::Result<String> {
    let body = serde_json::json!({ "tenant_id": id });
    let mut tries = 0;
    loop {
        match admin.post("/api/v2/admin/tenants/add", &body) {
            Ok(answer) => {
                let key = answer["api_key"].as_str().context("the gateway answered no api_key")?;
                return Ok(key.to_string());
            }
            Err(e) if e.to_string().starts_with("503") && tries < ADD_RETRIES_MAX => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e.context(format!("adding tenant {id}"))),
        }
    }
}

/// Waits until `key` is accepted by the gateway at `url` (any answer but 401).
fn wait_key_works(
    http: &reqwest::blocking::Client,
    url: &str,
    key: &str,
    since: Instant,
) -> anyhow::Result<()> {
    let probe = format!("{url}/api/v2/select?p=probe&c=1.1.1/1.1.1/1.1.1");
    loop {
        let status = http.get(&probe).bearer_auth(key).send().map(|r| r.status().as_u16());
        if matches!(status, Ok(s) if s != 401) {
            return Ok(());
        }
        if since.elapsed() > PROBE_DEADLINE {
            bail!("a new key did not work through {url} within {PROBE_DEADLINE:?} ({status:?})");
        }
        std::thread::sleep(PROBE_PAUSE);
    }
}

/// Bands of `band` adds in the order they finished: rate and latency of each.
fn bands(done: &[(Duration, Duration)], band: usize) -> Vec<Band> {
    let mut out = Vec::new();
    let mut previous_end = Duration::ZERO;
    for (k, chunk) in done.chunks(band).enumerate() {
        let end = chunk.last().map_or(previous_end, |(_, f)| *f);
        let span = (end - previous_end).as_secs_f64().max(f64::EPSILON);
        let mut latencies: Vec<Duration> = chunk.iter().map(|(l, _)| *l).collect();
        out.push(Band {
            from: k * band,
            to: k * band + chunk.len(),
            adds_per_s: chunk.len() as f64 / span,
            p50_ms: percentile_ms(&mut latencies, 0.50),
            p99_ms: percentile_ms(&mut latencies, 0.99),
        });
        previous_end = end;
    }
    out
}

/// The `q` quantile (0..=1) of `values`, in milliseconds; 0 for none.
fn percentile_ms(values: &mut [Duration], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort();
    let rank = ((values.len() as f64 * q).ceil() as usize).clamp(1, values.len());
    values[rank - 1].as_secs_f64() * 1000.0
}

/// The processes to weigh: with `--dev`, the gateway and every node of that cluster.
fn processes(config: &BenchConfig) -> anyhow::Result<Vec<(String, u32)>> {
    let Some(dir) = &config.gateway.dev else { return Ok(Vec::new()) };
    let bytes = std::fs::read(dir.join("dev.json")).context("reading dev.json")?;
    let dev: crate::dev::DevJson = serde_json::from_slice(&bytes).context("parsing dev.json")?;
    let mut out = vec![("gateway".to_string(), dev.gateway_pid)];
    out.extend(dev.nodes.iter().map(|n| (format!("node {}", n.id), n.pid)));
    Ok(out)
}

/// Resident memory of `pid` from /proc (0 when it cannot be read: another OS, a gone process).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok());
    kib.unwrap_or(0) * 1024
}

impl AdminAddReport {
    pub fn print_text(&self) {
        println!(
            "added {} tenants with {} clients in {:.1} s: {:.0} adds/s",
            self.added, self.concurrency, self.seconds, self.adds_per_s
        );
        println!("{:>9} {:>9} {:>8} {:>9} {:>9}", "from", "to", "adds/s", "p50 ms", "p99 ms");
        for b in &self.bands {
            println!(
                "{:>9} {:>9} {:>8.0} {:>9.1} {:>9.1}",
                b.from, b.to, b.adds_per_s, b.p50_ms, b.p99_ms
            );
        }
        println!("last band against the first: {:.2} of its rate", self.last_band_vs_first);
        println!(
            "{} adds one at a time: p50 {:.1} ms, p99 {:.1} ms",
            self.single_adds, self.single_p50_ms, self.single_p99_ms
        );
        println!(
            "a new key works through all {} gateways: p50 {:.1} ms, max {:.1} ms after the answer",
            self.gateways_probed, self.key_everywhere_p50_ms, self.key_everywhere_max_ms
        );
        for m in &self.memory {
            println!(
                "{}: RSS {:.1} MiB -> {:.1} MiB, {:.0} B per tenant added",
                m.process,
                m.rss_before_bytes as f64 / 1048576.0,
                m.rss_after_bytes as f64 / 1048576.0,
                m.bytes_per_tenant
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: bands cut the finished adds in order and rate each by its own span; percentiles
    // take the nearest rank.
    #[test]
    fn bands_and_percentiles() {
        let ms = Duration::from_millis;
        let done: Vec<(Duration, Duration)> = (1..=5).map(|i| (ms(i), ms(100 * i))).collect();
        let b = bands(&done, 2);
        assert_eq!(b.len(), 3);
        assert_eq!((b[0].from, b[0].to, b[2].from, b[2].to), (0, 2, 4, 5));
        assert!((b[0].adds_per_s - 10.0).abs() < 1e-9, "2 adds in 200 ms");
        assert!((b[1].adds_per_s - 10.0).abs() < 1e-9, "2 adds from 200 to 400 ms");
        assert_eq!((b[0].p50_ms, b[0].p99_ms), (1.0, 2.0));
        let mut v = vec![ms(3), ms(1), ms(2), ms(4)];
        assert_eq!(percentile_ms(&mut v, 0.5), 2.0);
        assert_eq!(percentile_ms(&mut v, 1.0), 4.0);
        assert_eq!(percentile_ms(&mut [], 0.5), 0.0);
    }
}
