//! A register client: reads and writes one key through the gateway, recording each operation.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;

use super::history::{Key, Op, Outcome, Recorder, Step};

/// How long a client waits for an answer; past it the operation is indeterminate. Above the
/// gateway's own bounds (1.5 s a forwarding step), so a timeout here means a hang to look at.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause between two operations of one client, drawn in this range: a handful of operations per
/// second per key keeps each key's history a few hundred operations long, which the search
/// checks in well under a second.
pub const THINK_MS_MIN: u64 = 40;
pub const THINK_MS_MAX: u64 = 240;

/// Pause after an operation failed, so an outage of a few seconds costs a key a few
/// indeterminate operations, not hundreds.
pub const ERROR_BACKOFF: Duration = Duration::from_millis(300);

/// The operations one client makes at most, whatever the nemesis's schedule.
pub const OPS_PER_CLIENT_MAX: usize = 400;

/// Where a client's key lives.
pub struct Target {
    pub key: Key,
    /// The tenant's API key.
    pub api_key: String,
    pub phext: String,
    pub coord: String,
}

/// What a client needs besides its target.
pub struct Shared {
    pub base: String,
    pub recorder: Arc<Recorder>,
    pub stop: Arc<AtomicBool>,
    /// The next free process id: a client takes a fresh one after an indeterminate write.
    pub processes: Arc<AtomicU64>,
}

/// Runs operations on `target` until `stop` or [`OPS_PER_CLIENT_MAX`]. Values are unique:
/// the key, the process and a count. Returns how many operations it made.
pub fn run(target: &Target, shared: &Shared, mut rng: StdRng) -> usize {
    let http = reqwest::blocking::Client::builder().timeout(CLIENT_TIMEOUT).build().unwrap();
    let mut process = shared.processes.fetch_add(1, Ordering::SeqCst);
    let mut made = 0;
    while made < OPS_PER_CLIENT_MAX && !shared.stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(rng.gen_range(THINK_MS_MIN..=THINK_MS_MAX)));
        let op = if rng.gen_bool(0.5) {
            let k = target.key;
            Op::Write(format!("t{}p{}c{}-{process}-{made}", k.tenant, k.phext, k.coord))
        } else {
            Op::Read
        };
        shared.recorder.record(process, target.key, Step::Invoke(op.clone()));
        let outcome = send(&http, &shared.base, target, &op);
        let failed = matches!(outcome, Outcome::Indeterminate(_));
        shared.recorder.record(process, target.key, Step::Complete(outcome));
        made += 1;
        if failed {
            if matches!(op, Op::Write(_)) {
                // The write may still take effect at any later moment: its process stays in
                // flight for good, and this client goes on as another.
                process = shared.processes.fetch_add(1, Ordering::SeqCst);
            }
            std::thread::sleep(ERROR_BACKOFF);
        }
    }
    made
}

/// One operation; any answer but the route's success is indeterminate.
pub fn send(http: &reqwest::blocking::Client, base: &str, target: &Target, op: &Op) -> Outcome {
    let query = format!("p={}&c={}", target.phext, target.coord);
    let request = match op {
        Op::Read => http.get(format!("{base}/select?{query}")),
        Op::Write(v) => http.post(format!("{base}/update?{query}")).body(v.clone()),
    };
    let answer = request.bearer_auth(&target.api_key).send().and_then(|r| {
        let status = r.status().as_u16();
        r.text().map(|body| (status, body))
    });
    match (op, answer) {
        (Op::Read, Ok((200, body))) => Outcome::ReadOk(body),
        (Op::Write(v), Ok((200, body))) => {
            // The answer names the bytes written; anything else is not this route's success.
            if body == format!("Updated {} bytes", v.len()) {
                Outcome::WriteOk
            } else {
                Outcome::Indeterminate(format!("200 {body:?}"))
            }
        }
        (_, Ok((status, body))) => Outcome::Indeterminate(format!("{status} {body:?}")),
        (_, Err(e)) => Outcome::Indeterminate(format!("no answer: {e}")),
    }
}
