//! Counting what the workers saw and saying it: latency per operation from HDR histograms,
//! throughput, and errors by status; as text for people or JSON for scripts.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::Op;

/// The slowest latency a histogram records, in nanoseconds; slower requests count as this.
/// The request timeout is lower, so nothing real is clipped.
const LATENCY_NS_MAX: u64 = 60_000_000_000;

/// Significant decimal digits the histograms keep: 0.1% error on every percentile.
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;

/// What one worker (or, merged, all of them) counted.
pub struct Tally {
    latency_ns: Vec<Histogram<u64>>,
    /// Failed requests by operation and status (`io` for no answer at all).
    errors: BTreeMap<(Op, String), u64>,
}

impl Tally {
    pub fn new() -> Tally {
        let latency_ns = Op::ALL
            .iter()
            .map(|_| {
                Histogram::new_with_bounds(1, LATENCY_NS_MAX, LATENCY_SIGNIFICANT_DIGITS)
                    .expect("the bounds are constants that hdrhistogram accepts")
            })
            .collect();
        Tally { latency_ns, errors: BTreeMap::new() }
    }

    pub fn ok(&mut self, op: Op, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX).clamp(1, LATENCY_NS_MAX);
        self.latency_ns[op as usize].saturating_record(ns);
    }

    pub fn error(&mut self, op: Op, status: String) {
        *self.errors.entry((op, status)).or_insert(0) += 1;
    }

    pub fn merge(&mut self, other: &Tally) {
        for (mine, theirs) in self.latency_ns.iter_mut().zip(&other.latency_ns) {
            // Same bounds on both sides, so adding cannot fail.
            let _ = mine.add(theirs);
        }
        for (k, n) in &other.errors {
            *self.errors.entry(k.clone()).or_insert(0) += n;
        }
    }

    pub fn report(&self, setup: Setup, elapsed: Duration) -> Report {
        let secs = elapsed.as_secs_f64().max(f64::MIN_POSITIVE);
        let mut ops = Vec::new();
        for op in Op::ALL {
            let h = &self.latency_ns[op as usize];
            let errors: BTreeMap<String, u64> = self
                .errors
                .iter()
                .filter(|((o, _), _)| *o == op)
                .map(|((_, s), n)| (s.clone(), *n))
                .collect();
            if h.is_empty() && errors.is_empty() {
                continue;
            }
            let us = |ns: u64| ns as f64 / 1000.0;
            ops.push(OpReport {
                op: op.name(),
                ok: h.len(),
                errors: errors.values().sum(),
                ok_per_s: h.len() as f64 / secs,
                p50_us: us(h.value_at_quantile(0.50)),
                p99_us: us(h.value_at_quantile(0.99)),
                p999_us: us(h.value_at_quantile(0.999)),
                max_us: us(h.max()),
                mean_us: h.mean() / 1000.0,
                errors_by_status: errors,
            });
        }
        let mut errors_by_status = BTreeMap::new();
        for ((_, status), n) in &self.errors {
            *errors_by_status.entry(status.clone()).or_insert(0) += n;
        }
        let ok: u64 = ops.iter().map(|o| o.ok).sum();
        Report {
            setup,
            elapsed_s: secs,
            ok,
            ok_per_s: ok as f64 / secs,
            errors: errors_by_status.values().sum(),
            errors_by_status,
            ops,
        }
    }
}

/// What was run, echoed in the report so a figure carries its conditions.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    pub url: String,
    pub tenants: usize,
    pub concurrency: usize,
    pub duration_s: f64,
    pub mix: String,
    pub scrolls: usize,
    pub scroll_bytes: usize,
    pub document_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct OpReport {
    pub op: &'static str,
    /// Requests answered 2xx; only these are in the latency figures.
    pub ok: u64,
    pub errors: u64,
    pub ok_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
    pub errors_by_status: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub setup: Setup,
    pub elapsed_s: f64,
    pub ok: u64,
    pub ok_per_s: f64,
    pub errors: u64,
    pub errors_by_status: BTreeMap<String, u64>,
    pub ops: Vec<OpReport>,
}

impl Report {
    pub fn print_text(&self) {
        let s = &self.setup;
        println!(
            "sq-cloud bench: {} | {} tenants, concurrency {}, {:.1} s, mix {}, documents of {} scrolls x {} B ({} B)",
            s.url, s.tenants, s.concurrency, self.elapsed_s, s.mix, s.scrolls, s.scroll_bytes, s.document_bytes
        );
        println!(
            "{:<8} {:>10} {:>12} {:>10} {:>10} {:>10} {:>10} {:>8}",
            "op", "ok", "req/s", "p50 µs", "p99 µs", "p99.9 µs", "max µs", "errors"
        );
        for o in &self.ops {
            println!(
                "{:<8} {:>10} {:>12.0} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>8}",
                o.op, o.ok, o.ok_per_s, o.p50_us, o.p99_us, o.p999_us, o.max_us, o.errors
            );
        }
        println!("total    {:>10} {:>12.0}", self.ok, self.ok_per_s);
        if self.errors > 0 {
            let list: Vec<String> =
                self.errors_by_status.iter().map(|(s, n)| format!("{s}: {n}")).collect();
            println!("errors by status: {}", list.join(", "));
            if self.errors_by_status.contains_key("429") {
                println!("note: 429 is the node's per-tenant rate limit (node::limits::BURST_PER_SECOND); spread the load over more --tenants");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> Setup {
        Setup {
            url: "u".into(),
            tenants: 1,
            concurrency: 1,
            duration_s: 1.0,
            mix: "select=1".into(),
            scrolls: 1,
            scroll_bytes: 1,
            document_bytes: 1,
        }
    }

    // Goal: merged tallies give exact counts, percentiles within the histogram's precision, and
    // errors grouped by status across operations.
    #[test]
    fn merge_and_report() {
        let mut a = Tally::new();
        let mut b = Tally::new();
        for i in 1..=1000u64 {
            a.ok(Op::Select, Duration::from_micros(i));
        }
        b.ok(Op::Update, Duration::from_millis(3));
        b.error(Op::Update, "429".into());
        b.error(Op::Select, "429".into());
        b.error(Op::Select, "io".into());
        a.merge(&b);
        let r = a.report(setup(), Duration::from_secs(2));
        assert_eq!(r.ok, 1001);
        assert_eq!(r.errors, 3);
        assert_eq!(r.errors_by_status["429"], 2);
        let select = r.ops.iter().find(|o| o.op == "select").unwrap();
        assert_eq!((select.ok, select.errors), (1000, 2));
        assert!((select.p50_us - 500.0).abs() <= 1.0, "{}", select.p50_us);
        assert!((select.p99_us - 990.0).abs() <= 1.0, "{}", select.p99_us);
        assert!((select.ok_per_s - 500.0).abs() < 1e-9);
        assert!(r.ops.iter().all(|o| o.op != "toc"), "operations not run are left out");
    }
}
