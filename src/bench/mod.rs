//! `sq-cloud bench`: a load generator in the manner of redis-benchmark or pgbench.
//!
//! It makes its own tenants through the admin API (tier team, daily limit lifted so a long run
//! is not cut short; archived again at the end) or uses the one `--key` names, writes each
//! tenant's document before the clock starts, then runs `--concurrency` workers for
//! `--duration`. Each worker is a thread with one keep-alive connection ([`conn`]) that sends the
//! operation mix to random scrolls of random tenants and records every latency in HDR
//! histograms ([`report`]).
//!
//! `--mode admin-add` measures the control plane instead: tenants added through the gateway
//! by concurrent admin clients, one-at-a-time adds, how soon a new key works everywhere, and
//! memory per tenant ([`admin_add`]).

mod admin_add;
mod conn;
mod report;
mod workers;

use std::time::Duration;

use anyhow::{bail, Context};

use crate::tooling::GatewayFlags;

/// The most workers (threads, connections) one bench runs: a bound, not a target.
pub const CONCURRENCY_MAX: usize = 1024;

/// The most tenants one bench makes.
pub const TENANTS_MAX: usize = 10_000;

/// The most scrolls in one bench document (a gigabyte at the default scroll size).
pub const SCROLLS_MAX: usize = 1_000_000;

/// Bytes one `insert` appends.
pub const INSERT_BYTES: usize = 16;

/// The operations a mix may hold. `insert` appends to a second phext (`<phext>-inserts`) so
/// that the document the others read keeps its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    Select = 0,
    Insert = 1,
    Update = 2,
    Toc = 3,
    Get = 4,
}

impl Op {
    pub const ALL: [Op; 5] = [Op::Select, Op::Insert, Op::Update, Op::Toc, Op::Get];

    pub fn name(self) -> &'static str {
        match self {
            Op::Select => "select",
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Toc => "toc",
            Op::Get => "get",
        }
    }
}

/// An operation mix: weights that need not add up to 100.
#[derive(Debug, Clone, PartialEq)]
pub struct Mix(Vec<(Op, u32)>);

impl Mix {
    /// `select=80,update=20`.
    pub fn parse(text: &str) -> anyhow::Result<Mix> {
        let mut parts = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, weight) = item
                .split_once('=')
                .with_context(|| format!("{item:?}: write OP=WEIGHT, e.g. select=80"))?;
            let op = Op::ALL.into_iter().find(|o| o.name() == name.trim()).with_context(|| {
                format!("unknown operation {name:?}: use select, insert, update, toc or get")
            })?;
            let weight: u32 = weight
                .trim()
                .parse()
                .with_context(|| format!("{item:?}: the weight must be a whole number"))?;
            if parts.iter().any(|(o, _)| *o == op) {
                bail!("{name} is listed twice");
            }
            if weight > 0 {
                parts.push((op, weight));
            }
        }
        if parts.is_empty() {
            bail!("the mix {text:?} has no operation with a weight above 0");
        }
        Ok(Mix(parts))
    }

    /// The operation for a number drawn uniformly from `0..self.total()`.
    pub fn pick(&self, mut draw: u32) -> Op {
        for (op, w) in &self.0 {
            if draw < *w {
                return *op;
            }
            draw -= w;
        }
        self.0[self.0.len() - 1].0
    }

    pub fn total(&self) -> u32 {
        self.0.iter().map(|(_, w)| w).sum()
    }
}

impl std::fmt::Display for Mix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let items: Vec<String> = self.0.iter().map(|(o, w)| format!("{}={w}", o.name())).collect();
        f.write_str(&items.join(","))
    }
}

/// What a bench run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// SQ requests of the --mix against tenants' documents.
    Load,
    /// Tenants added through the admin API (--tenants of them, --concurrency at once).
    AdminAdd,
}

/// `sq-cloud bench` flags.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub gateway: GatewayFlags,
    /// Load this one tenant (its key) instead of making tenants.
    #[arg(long, conflicts_with = "tenants")]
    pub key: Option<String>,
    /// Tenants to make; requests are spread over them at random. Each tenant may send
    /// 1,000 requests per second (node::limits::BURST_PER_SECOND).
    #[arg(long, default_value_t = 1)]
    pub tenants: usize,
    /// Workers, each one thread with one keep-alive connection.
    #[arg(long, short = 'c', default_value_t = 16)]
    pub concurrency: usize,
    /// Seconds to run, after the documents are written.
    #[arg(long, short = 'd', default_value_t = 10.0)]
    pub duration: f64,
    /// Operation mix: weights of select, insert, update, toc, get.
    #[arg(long, default_value = "select=80,update=20")]
    pub mix: String,
    /// Scrolls per document, written before the clock starts.
    #[arg(long, default_value_t = 1000)]
    pub scrolls: usize,
    /// Bytes per scroll.
    #[arg(long, default_value_t = 1000)]
    pub scroll_bytes: usize,
    /// The phext the bench reads and writes (inserts go to `<phext>-inserts`).
    #[arg(long, default_value = "bench")]
    pub phext: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Keep the tenants the bench made instead of archiving them at the end.
    #[arg(long)]
    pub keep_tenants: bool,
    /// What to measure: `load` (SQ requests) or `admin-add` (registry growth; keeps its
    /// tenants).
    #[arg(long, value_enum, default_value = "load")]
    pub mode: Mode,
    /// admin-add: adds per reported band.
    #[arg(long, default_value_t = 10_000)]
    pub band: usize,
    /// admin-add: adds made one at a time after the concurrent ones, each probed through every
    /// gateway.
    #[arg(long, default_value_t = 200)]
    pub single_adds: usize,
    /// admin-add: another gateway of the same cluster where new keys must work too
    /// (repeatable).
    #[arg(long)]
    pub probe_gateway: Vec<String>,
}

impl BenchArgs {
    pub fn into_config(self) -> anyhow::Result<BenchConfig> {
        if !(self.duration.is_finite() && self.duration > 0.0) {
            bail!("--duration must be a positive number of seconds");
        }
        Ok(BenchConfig {
            gateway: self.gateway,
            key: self.key,
            tenants: self.tenants,
            concurrency: self.concurrency,
            duration: Duration::from_secs_f64(self.duration),
            mix: Mix::parse(&self.mix)?,
            scrolls: self.scrolls,
            scroll_bytes: self.scroll_bytes,
            phext: self.phext,
            json: self.json,
            keep_tenants: self.keep_tenants,
            mode: self.mode,
            band: self.band,
            single_adds: self.single_adds,
            probe_gateways: self.probe_gateway,
        })
    }
}

/// Everything `sq-cloud bench` was asked to do.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub gateway: GatewayFlags,
    /// Use this tenant key instead of making tenants.
    pub key: Option<String>,
    pub tenants: usize,
    pub concurrency: usize,
    pub duration: Duration,
    pub mix: Mix,
    pub scrolls: usize,
    pub scroll_bytes: usize,
    pub phext: String,
    pub json: bool,
    /// Keep the tenants bench made, rather than archiving them at the end.
    pub keep_tenants: bool,
    pub mode: Mode,
    pub band: usize,
    pub single_adds: usize,
    pub probe_gateways: Vec<String>,
}

/// Runs the whole benchmark and prints its report.
pub fn run(config: BenchConfig) -> anyhow::Result<()> {
    let target = config.gateway.target()?;
    if config.mode == Mode::AdminAdd {
        let report = admin_add::run(&config, &target)?;
        if config.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            report.print_text();
        }
        return Ok(());
    }
    check(&config)?;
    let plan = workers::Plan::new(&config, &target)?;
    let tenants = workers::Tenants::obtain(&config, &target)?;
    let outcome = workers::prepare(&plan, &tenants, &config)
        .and_then(|()| workers::measure(&plan, &tenants, &config));
    tenants.release(&config);
    let report = outcome?;
    if config.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report.print_text();
    }
    Ok(())
}

fn check(config: &BenchConfig) -> anyhow::Result<()> {
    if config.concurrency == 0 || config.concurrency > CONCURRENCY_MAX {
        bail!("--concurrency must be 1..={CONCURRENCY_MAX}");
    }
    if config.key.is_none() && (config.tenants == 0 || config.tenants > TENANTS_MAX) {
        bail!("--tenants must be 1..={TENANTS_MAX}");
    }
    if config.scrolls == 0 || config.scroll_bytes == 0 {
        bail!("--scrolls and --scroll-bytes must be at least 1");
    }
    if config.scroll_bytes > proto::request::BODY_BYTES_MAX {
        bail!(
            "--scroll-bytes must be at most {} (the request body limit)",
            proto::request::BODY_BYTES_MAX
        );
    }
    if config.scrolls > SCROLLS_MAX {
        bail!("--scrolls must be at most {SCROLLS_MAX}");
    }
    if proto::PhextName::parse(&config.phext).is_err()
        || proto::PhextName::parse(&format!("{}-inserts", config.phext)).is_err()
    {
        bail!("--phext {:?} is not a valid phext name", config.phext);
    }
    if config.duration.is_zero() {
        bail!("--duration must be above 0");
    }
    Ok(())
}

/// The coordinate of scroll `i` of a bench document: a hundred scrolls per section.
pub fn coordinate(i: usize) -> String {
    format!("1.1.1/1.1.1/1.{}.{}", i / 100 + 1, i % 100 + 1)
}

/// The text of scroll `i` in a freshly prepared document.
pub fn scroll_text(i: usize, bytes: usize) -> String {
    format!("scroll {i} ").chars().cycle().take(bytes).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: mixes parse as written, refuse what they cannot mean, and pick in proportion.
    #[test]
    fn mixes() {
        let mix = Mix::parse("select=80, update=20").unwrap();
        assert_eq!(mix.total(), 100);
        assert_eq!(mix.to_string(), "select=80,update=20");
        let updates = (0..100).filter(|d| mix.pick(*d) == Op::Update).count();
        assert_eq!(updates, 20);
        assert_eq!(Mix::parse("toc=0,get=1").unwrap().pick(0), Op::Get);
        for bad in ["", "select", "select=x", "nope=1", "select=1,select=2", "select=0"] {
            assert!(Mix::parse(bad).is_err(), "{bad:?}");
        }
    }

    // Goal: bench documents use valid, distinct coordinates in document order.
    #[test]
    fn coordinates() {
        let all: Vec<proto::Coordinate> =
            (0..1000).map(|i| proto::Coordinate::parse(&coordinate(i)).unwrap()).collect();
        assert!(all.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(scroll_text(7, 20).len(), 20);
    }
}
