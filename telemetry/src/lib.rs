//! The process's Prometheus recorder: one installer, one set of latency buckets and one upkeep
//! thread for nodes and gateways alike, so their histograms can be compared bucket for bucket.
//!
//! This crate owns how metrics are recorded and rendered, not which metrics exist: each caller
//! describes its own series. It knows nothing of tenants, requests or the network. It also
//! raises the process's open-file limit for both ([`files`]).

pub mod files;

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Upper bounds, in seconds, of the latency histogram buckets: 100 µs (a read of a loaded
/// tenant) to 5 s (past every timeout a request can meet).
pub const LATENCY_BUCKETS_S: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// How often recorded histogram samples are folded into buckets when nobody scrapes: the
/// recorder keeps every raw sample until then, so without this an unscraped process grows by
/// 8 bytes per request.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the recorder for this process, once: every series gets `label` (e.g. `node=<id>`)
/// when given, `describe` runs once to write the HELP lines. A later call does nothing. A
/// recorder that cannot be installed is logged, and [`render`] then answers empty text.
pub fn install(label: Option<(&str, String)>, describe: impl FnOnce()) {
    HANDLE.get_or_init(|| {
        let mut builder = PrometheusBuilder::new();
        if let Some((key, value)) = label {
            builder = builder.add_global_label(key, value);
        }
        let installed =
            builder.set_buckets(&LATENCY_BUCKETS_S).and_then(|b| b.install_recorder());
        let handle = match installed {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "metrics recorder not installed");
                return None;
            }
        };
        describe();
        let upkeep = handle.clone();
        // The recorder is process-wide, so its upkeep is too: a thread that lives as long as it.
        let spawned =
            std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no metrics upkeep thread; samples are folded only on scrape");
        }
        Some(handle)
    });
}

/// This process's metrics as Prometheus text; empty before [`install`] or when it failed.
pub fn render() -> String {
    HANDLE.get().and_then(|h| h.as_ref()).map(|h| h.render()).unwrap_or_default()
}
