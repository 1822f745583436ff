//! Clients: each works on one tenant through a random gateway, writing the cells it owns and
//! reading any cell of its tenant, and checks every answer against the model as it arrives.
//!
//! Writes are tagged with their tenant and a unique id, so a read can tell a stale value from a
//! value that was never written and from another tenant's data. Some writes are large, so that
//! tenants run into their quota.

use std::sync::Arc;
use std::time::Duration;

use proto::request::Method;
use proto::{ApiError, Coordinate, Doc};
use tokio_util::sync::CancellationToken;

use crate::model::{tag, CellKey, Outcome};
use crate::monitor::{Invariant, Violation};
use crate::rng::Rng;
use crate::world::{write_outcome, World, WRITE_HORIZON_MS};

/// The phexts of every tenant.
pub const PHEXTS: [&str; 2] = ["alpha", "beta"];
/// The phext the liveness probes and the chases write (clients do not).
pub const PROBE_PHEXT: &str = "probe";
/// Coordinates written in each phext (last components), across two chapters.
const COORDS: [[u32; 9]; 6] = [
    [1, 1, 1, 1, 1, 1, 1, 1, 1],
    [1, 1, 1, 1, 1, 1, 1, 1, 2],
    [1, 1, 1, 1, 1, 1, 1, 1, 5],
    [1, 1, 1, 1, 1, 1, 2, 1, 1],
    [1, 1, 1, 1, 2, 1, 1, 1, 3],
    [2, 1, 1, 1, 1, 1, 1, 1, 1],
];
/// Pause between a client's requests, in milliseconds.
const THINK_MS: (u64, u64) = (30, 500);
/// Size of a large write, in bytes: a handful of them fill a 1 MiB quota.
const LARGE_WRITE_BYTES: (u64, u64) = (150_000, 450_000);
/// Chance of a large write, in permille: one write in ten. Most tenants still meet their quota
/// (about 190 refusals with 507 per 100 seeds, by `--census`), and large documents are most of
/// the simulator's work, so this share keeps 1,000 seeds within 5 minutes of a 2-core machine.
const LARGE_WRITE_PERMILLE: u64 = 100;
/// Size of an ordinary write's filler, in bytes.
const SMALL_WRITE_BYTES: (u64, u64) = (0, 80);
/// Chance, in permille, that an update is sized to leave the tenant one byte under its quota,
/// exactly at it, or one byte over (when the client knows both for sure).
const BOUNDARY_WRITE_PERMILLE: u64 = 120;

/// Every cell of a tenant, in a fixed order.
pub fn all_cells() -> Vec<CellKey> {
    let mut cells = Vec::new();
    for p in PHEXTS {
        for c in COORDS {
            // The components above are all in range.
            let coord = Coordinate::from_components(c).unwrap_or(Coordinate::ORIGIN);
            cells.push(CellKey { phext: p.to_string(), coord });
        }
    }
    cells
}

pub struct Client {
    pub id: u64,
    pub tenant: String,
    /// The cells this client alone writes.
    pub own: Vec<CellKey>,
    pub rng: Rng,
    seq: u64,
}

enum Op {
    Select,
    Get,
    Query,
    Checksum,
    Update,
    Insert,
    Delete,
}

impl Client {
    pub fn new(id: u64, tenant: String, own: Vec<CellKey>, rng: Rng) -> Client {
        Client { id, tenant, own, rng, seq: 0 }
    }

    pub async fn run(mut self, world: Arc<World>, stop: CancellationToken) {
        while !stop.is_cancelled() {
            self.step(&world).await;
            let think = Duration::from_millis(self.rng.range(THINK_MS.0, THINK_MS.1));
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(think) => {}
            }
        }
    }

    async fn step(&mut self, world: &World) {
        let ops =
            [Op::Select, Op::Get, Op::Query, Op::Checksum, Op::Update, Op::Insert, Op::Delete];
        let op = &ops[self.rng.weighted(&[25, 10, 6, 5, 38, 10, 6])];
        let Some(key) = world.key_for(&self.tenant, &mut self.rng) else { return };
        let gw = self.rng.below(world.gateways.len() as u64) as usize;
        let result = match op {
            Op::Select => self.select(world, gw, &key).await,
            Op::Get => self.get(world, gw, &key).await,
            Op::Query => self.query(world, gw, &key).await,
            Op::Checksum => self.checksum(world, gw, &key).await,
            Op::Update | Op::Insert | Op::Delete if self.own.is_empty() => Ok(()),
            Op::Update => self.write(world, gw, &key, false, false).await,
            Op::Insert => self.write(world, gw, &key, true, false).await,
            Op::Delete => self.write(world, gw, &key, false, true).await,
        };
        world.monitor.check(result);
    }

    fn text(&mut self) -> String {
        let large = self.rng.chance(LARGE_WRITE_PERMILLE);
        let (lo, hi) = if large { LARGE_WRITE_BYTES } else { SMALL_WRITE_BYTES };
        let len = self.rng.range(lo, hi) as usize;
        self.text_of(len)
    }

    /// A new write's text: its tag, then `filler` bytes.
    fn text_of(&mut self, filler: usize) -> String {
        self.seq += 1;
        // A short random run, repeated: cheap to make, and no two writes alike.
        let run = self.rng.letters(filler.clamp(1, 64));
        let mut text = run.repeat(filler / run.len() + 1);
        text.truncate(filler);
        format!("{}{text}", tag(&self.tenant, &format!("c{}.{}", self.id, self.seq)))
    }

    /// Sometimes, the text of an update of `cell` that leaves the tenant one byte under its
    /// quota, exactly at it, or one byte over: only when every cell of the tenant and its quota
    /// are known for sure.
    fn boundary_text(&mut self, world: &World, cell: &CellKey) -> Option<String> {
        if !self.rng.chance(BOUNDARY_WRITE_PERMILLE) {
            return None;
        }
        let quota = world.quota_now(&self.tenant)?;
        let model = world.model();
        model.certain_bytes(&self.tenant)?;
        // The tenant's size with this cell holding one byte; each more byte adds one.
        let one = model.bytes_with(&self.tenant, cell, "x");
        drop(model);
        let target = quota + self.rng.below(3) - 1;
        let len = (target + 1).checked_sub(one)? as usize;
        let tag_len = tag(&self.tenant, &format!("c{}.{}", self.id, self.seq + 1)).len();
        let filler = len.checked_sub(tag_len)?;
        // No larger than a large write: the run's cost is mostly its bytes.
        if filler as u64 > LARGE_WRITE_BYTES.1 {
            return None;
        }
        world.stats().boundary_writes += 1;
        Some(self.text_of(filler))
    }

    async fn write(
        &mut self,
        world: &World,
        gw: usize,
        key: &str,
        insert: bool,
        delete: bool,
    ) -> Result<(), Violation> {
        let cell = self.rng.pick(&self.own).clone();
        let certain = world.model().certain(&self.tenant, &cell);
        let insert = insert && certain.is_some();
        let boundary = if delete || insert { None } else { self.boundary_text(world, &cell) };
        let text = match boundary {
            Some(text) => text,
            None if delete => String::new(),
            None => self.text(),
        };
        let value = match (&certain, insert) {
            (Some(base), true) => format!("{base}{text}"),
            _ => text.clone(),
        };
        let query = format!("p={}&c={}", cell.phext, cell.coord);
        let (method, route) = write_route(delete, insert);
        let now = world.now_ms();
        let id = world.model().begin_write(
            &self.tenant,
            &cell,
            value.clone(),
            now,
            now + WRITE_HORIZON_MS,
        );
        if insert {
            world.model().set_appended(id, &text);
        }
        let result = world.sq(world.gateway(gw), key, method, route, &query, text.as_bytes()).await;
        let outcome = write_outcome(&result);
        world.model().end_write(id, outcome, world.now_ms());
        if let Err(ApiError::QuotaExceeded { needed_bytes, free_bytes, quota_bytes }) = &result {
            world.stats().quota_refusals += 1;
            world.model().check_quota_refusal(
                &self.tenant,
                &cell,
                &value,
                now,
                *needed_bytes,
                *free_bytes,
                *quota_bytes,
            )?;
        }
        rate_limited(world, &self.tenant, &result)?;
        world.trace.event(format!(
            "c{} {} {} {}@{} ({} bytes): {}",
            self.id,
            self.tenant,
            route,
            cell.phext,
            cell.coord,
            text.len(),
            answer(&result)
        ));
        count_write(world, outcome);
        if outcome == Outcome::Acked && !delete {
            return world.model().check_quota(&self.tenant);
        }
        Ok(())
    }

    /// Sends a read and returns its body, or `None` (after counting it) if it failed.
    async fn read(
        &mut self,
        world: &World,
        gw: usize,
        key: &str,
        method: Method,
        route: &str,
        query: &str,
    ) -> Option<Vec<u8>> {
        let result = world.sq(world.gateway(gw), key, method, route, query, b"").await;
        world.trace.event(format!(
            "c{} {} {route} {query}: {}",
            self.id,
            self.tenant,
            answer(&result)
        ));
        world.monitor.check(rate_limited(world, &self.tenant, &result));
        match result {
            Ok(r) => {
                world.stats().reads_ok += 1;
                Some(r.body)
            }
            Err(_) => {
                world.stats().reads_failed += 1;
                None
            }
        }
    }

    fn any_cell(&mut self) -> CellKey {
        let cells = all_cells();
        self.rng.pick(&cells).clone()
    }

    async fn select(&mut self, world: &World, gw: usize, key: &str) -> Result<(), Violation> {
        let cell = self.any_cell();
        let start = world.now_ms();
        let query = format!("p={}&c={}", cell.phext, cell.coord);
        let Some(body) = self.read(world, gw, key, Method::Get, "select", &query).await else {
            return Ok(());
        };
        let text = String::from_utf8_lossy(&body);
        let mut model = world.model();
        model.check_read(&self.tenant, &cell, start, &text, false)?;
        model.observe(self.id, &self.tenant, &cell, &text)
    }

    async fn get(&mut self, world: &World, gw: usize, key: &str) -> Result<(), Violation> {
        let phext = *self.rng.pick(&PHEXTS);
        let start = world.now_ms();
        let Some(body) = self.read(world, gw, key, Method::Get, "get", &format!("p={phext}")).await
        else {
            return Ok(());
        };
        let doc = Doc::parse(&body).map_err(|e| malformed(&self.tenant, "get", e))?;
        let mut model = world.model();
        model.check_doc(&self.tenant, phext, start, &doc, false)?;
        for cell in all_cells().into_iter().filter(|c| c.phext == phext) {
            model.observe(self.id, &self.tenant, &cell, doc.get(&cell.coord))?;
        }
        Ok(())
    }

    async fn query(&mut self, world: &World, gw: usize, key: &str) -> Result<(), Violation> {
        let (a, b) = (self.any_cell(), self.any_cell());
        let Some(cells) = same_phext(&a, &b) else { return Ok(()) };
        let set: Vec<String> = cells.iter().map(|c| c.coord.to_string()).collect();
        let start = world.now_ms();
        let query = format!("p={}&set={}", a.phext, set.join(","));
        let Some(body) = self.read(world, gw, key, Method::Post, "query", &query).await else {
            return Ok(());
        };
        let rows: Vec<serde_json::Value> =
            serde_json::from_slice(&body).map_err(|e| malformed(&self.tenant, "query", e))?;
        let mut model = world.model();
        for row in rows {
            let coord = row["coordinate"].as_str().and_then(|c| Coordinate::parse(c).ok());
            let (Some(coord), Some(scroll)) = (coord, row["scroll"].as_str()) else {
                return Err(malformed(&self.tenant, "query", "a row without coordinate or scroll"));
            };
            let cell = CellKey { phext: a.phext.clone(), coord };
            model.check_read(&self.tenant, &cell, start, scroll, false)?;
            model.observe(self.id, &self.tenant, &cell, scroll)?;
        }
        Ok(())
    }

    async fn checksum(&mut self, world: &World, gw: usize, key: &str) -> Result<(), Violation> {
        let phext = *self.rng.pick(&PHEXTS);
        let before = world.model().certain_canonical(&self.tenant, phext);
        let Some(body) =
            self.read(world, gw, key, Method::Get, "checksum", &format!("p={phext}")).await
        else {
            return Ok(());
        };
        let after = world.model().certain_canonical(&self.tenant, phext);
        let (Some(before), Some(after)) = (before, after) else { return Ok(()) };
        if before != after {
            return Ok(());
        }
        let expected = proto::doc::checksum(&before);
        let got = String::from_utf8_lossy(&body);
        if got != expected {
            return Err(Violation::new(
                Invariant::StaleRead,
                format!("tenant {} checksum of {phext} is {got}; the acknowledged writes give {expected}", self.tenant),
            ));
        }
        Ok(())
    }
}

/// Checks a 429 against the model.
pub fn rate_limited(
    world: &World,
    tenant: &str,
    result: &Result<proto::SqResponse, ApiError>,
) -> Result<(), Violation> {
    if let Err(ApiError::RateLimited { reason, .. }) = result {
        world.stats().rate_refusals += 1;
        return world.model().check_rate_limited(tenant, reason);
    }
    Ok(())
}

/// Two cells of one phext, sorted, or `None` if they are in different phexts.
/// The method and route of a write: a delete, an insert (append) or an update.
fn write_route(delete: bool, insert: bool) -> (Method, &'static str) {
    match (delete, insert) {
        (true, _) => (Method::Get, "delete"),
        (false, true) => (Method::Post, "insert"),
        (false, false) => (Method::Post, "update"),
    }
}

/// Counts a write by its outcome in the run's stats.
fn count_write(world: &World, outcome: Outcome) {
    let mut stats = world.stats();
    match outcome {
        Outcome::Acked => stats.writes_acked += 1,
        Outcome::NotApplied => stats.writes_refused += 1,
        Outcome::Unknown => stats.writes_unknown += 1,
    }
}

fn same_phext(a: &CellKey, b: &CellKey) -> Option<Vec<CellKey>> {
    if a.phext != b.phext {
        return None;
    }
    let mut cells = vec![a.clone(), b.clone()];
    cells.sort();
    cells.dedup();
    Some(cells)
}

fn malformed(tenant: &str, route: &str, e: impl std::fmt::Display) -> Violation {
    Violation::new(
        Invariant::StaleRead,
        format!("tenant {tenant} got a malformed {route} answer: {e}"),
    )
}

/// A short account of an answer, for the trace.
pub fn answer(result: &Result<proto::SqResponse, ApiError>) -> String {
    match result {
        Ok(r) => format!("ok ({} bytes)", r.body.len()),
        Err(e) => {
            let text = e.to_string();
            text.chars().take(90).collect()
        }
    }
}

/// How long a chase lasts, in milliseconds: the time a returning head takes to be marked up (up
/// to about half a second), then past the lease the old primary won last
/// (`node::lease::LEASE_MS`, 600 ms).
const CHASE_MS: u64 = 1_500;
/// Pause between a chase's looks and requests, in milliseconds.
const CHASE_PAUSE_MS: (u64, u64) = (5, 30);

/// Chases `tenant` as it moves to a new primary while the old one, `old`, is cut off
/// (`crate::faults`), for [`CHASE_MS`]: reads a probe cell through gateway `to_old`, which
/// reaches only the old primary, again and again; and once gateway `to_new` routes the tenant
/// to another node, writes the cell through it, again and again. Each answer is checked against
/// the model; a read the old primary answers after the new one has served breaks
/// [`Invariant::Deposed`] as well.
pub async fn chase(
    world: Arc<World>,
    tenant: String,
    (to_new, to_old): (usize, usize),
    old: u64,
    mut rng: Rng,
) {
    let started = world.now_ms();
    let end = started + CHASE_MS;
    let cell = CellKey { phext: PROBE_PHEXT.to_string(), coord: Coordinate::ORIGIN };
    let query = format!("p={}&c={}", cell.phext, cell.coord);
    let pause =
        |rng: &mut Rng| Duration::from_millis(rng.range(CHASE_PAUSE_MS.0, CHASE_PAUSE_MS.1));
    let mut write_rng = rng.fork();
    let writes = async {
        let routed = |world: &World| world.gateway(to_new).views.current().tenant(&tenant)?.owner;
        while world.now_ms() < end {
            if routed(&world).is_none_or(|owner| owner == old) {
                tokio::time::sleep(pause(&mut write_rng)).await;
                continue;
            }
            let Some(key) = world.key_for(&tenant, &mut write_rng) else { return };
            let now = world.now_ms();
            let value = tag(&tenant, &format!("chase.{started}.{now}"));
            let id = world.model().begin_write(
                &tenant,
                &cell,
                value.clone(),
                now,
                now + WRITE_HORIZON_MS,
            );
            let body = value.as_bytes();
            let result =
                world.sq(world.gateway(to_new), &key, Method::Post, "update", &query, body).await;
            world.model().end_write(id, write_outcome(&result), world.now_ms());
            world.trace.event(format!("chase {tenant} update via g{to_new}: {}", answer(&result)));
            tokio::time::sleep(pause(&mut write_rng)).await;
        }
    };
    let reads = async {
        while world.now_ms() < end {
            let Some(key) = world.key_for(&tenant, &mut rng) else { return };
            let start = world.now_ms();
            let read = world.gateway(to_old);
            let read = world.sq(read, &key, Method::Get, "select", &query, b"").await;
            world.trace.event(format!("chase {tenant} select via g{to_old}: {}", answer(&read)));
            if let Ok(r) = read {
                let observed = String::from_utf8_lossy(&r.body);
                let checked = world.model().check_read(&tenant, &cell, start, &observed, false);
                world.monitor.check(checked);
            }
            tokio::time::sleep(pause(&mut rng)).await;
        }
    };
    tokio::join!(writes, reads);
}

/// Pause between a revoked-key client's requests, in milliseconds.
const REVOKED_THINK_MS: (u64, u64) = (40, 400);
/// Chance, in permille, that a revoked key goes through the lagging gateway (whose frozen view
/// still holds it, so that the owning node must refuse it) rather than a current one.
const THROUGH_STALE_PERMILLE: u64 = 600;

/// A client that keeps using keys it should no longer use: keys rotated away, and keys of
/// tenants disabled, archived or purged. It reads only; a node that serves it anything breaks
/// [`Invariant::Auth`], which the monitor checks against the node's own registry states.
pub async fn revoked_client(world: Arc<World>, mut rng: Rng, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let think = Duration::from_millis(rng.range(REVOKED_THINK_MS.0, REVOKED_THINK_MS.1));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(think) => {}
        }
        let mut candidates: Vec<(String, String, &'static str)> =
            world.revoked().into_iter().map(|r| (r.tenant, r.key, r.why)).collect();
        for tenant in world.disabled() {
            if let Some(k) = world.keys().get(&tenant) {
                candidates.push((tenant.clone(), k.current.clone(), "disabled"));
            }
        }
        if candidates.is_empty() {
            continue;
        }
        let (tenant, key, why) = rng.pick(&candidates).clone();
        let stale = world.stale_gateway().filter(|_| rng.chance(THROUGH_STALE_PERMILLE));
        let (gw, name) = match stale {
            Some(gw) => (gw, "the lagging gateway".to_string()),
            None => {
                let g = rng.below(world.gateways.len() as u64) as usize;
                (world.gateways[g].clone(), format!("g{g}"))
            }
        };
        let phext = *rng.pick(&PHEXTS);
        let result = world.sq(&gw, &key, Method::Get, "get", &format!("p={phext}"), b"").await;
        let refused = matches!(result, Err(ApiError::Unauthorized | ApiError::Forbidden(_)));
        {
            let mut stats = world.stats();
            stats.revoked_requests += 1;
            stats.revoked_refused += u64::from(refused);
        }
        world.trace.event(format!(
            "revoked-key client: {tenant}'s {why} key through {name}: {}",
            answer(&result)
        ));
    }
}
