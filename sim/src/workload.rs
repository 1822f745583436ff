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
/// Chance of a large write, in permille.
const LARGE_WRITE_PERMILLE: u64 = 200;
/// Size of an ordinary write's filler, in bytes.
const SMALL_WRITE_BYTES: (u64, u64) = (0, 80);

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
        self.seq += 1;
        let large = self.rng.chance(LARGE_WRITE_PERMILLE);
        let (lo, hi) = if large { LARGE_WRITE_BYTES } else { SMALL_WRITE_BYTES };
        let len = self.rng.range(lo, hi) as usize;
        // A short random run, repeated: cheap to make, and no two writes alike.
        let run = self.rng.letters(len.clamp(1, 64));
        let mut filler = run.repeat(len / run.len() + 1);
        filler.truncate(len);
        format!("{}{filler}", tag(&self.tenant, &format!("c{}.{}", self.id, self.seq)))
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
        let text = if delete { String::new() } else { self.text() };
        let value = match (&certain, insert) {
            (Some(base), true) => format!("{base}{text}"),
            _ => text.clone(),
        };
        let query = format!("p={}&c={}", cell.phext, cell.coord);
        let (method, route) = match (delete, insert) {
            (true, _) => (Method::Get, "delete"),
            (false, true) => (Method::Post, "insert"),
            (false, false) => (Method::Post, "update"),
        };
        let now = world.now_ms();
        let id = world.model().begin_write(&self.tenant, &cell, value, now, now + WRITE_HORIZON_MS);
        let result = world.sq(gw, key, method, route, &query, text.as_bytes()).await;
        let outcome = write_outcome(&result);
        world.model().end_write(id, outcome, world.now_ms());
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
        let mut stats = world.stats();
        match outcome {
            Outcome::Acked => stats.writes_acked += 1,
            Outcome::NotApplied => stats.writes_refused += 1,
            Outcome::Unknown => stats.writes_unknown += 1,
        }
        drop(stats);
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
        let result = world.sq(gw, key, method, route, query, b"").await;
        world.trace.event(format!(
            "c{} {} {route} {query}: {}",
            self.id,
            self.tenant,
            answer(&result)
        ));
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
        world.model().check_read(&self.tenant, &cell, start, &text, false)
    }

    async fn get(&mut self, world: &World, gw: usize, key: &str) -> Result<(), Violation> {
        let phext = *self.rng.pick(&PHEXTS);
        let start = world.now_ms();
        let Some(body) = self.read(world, gw, key, Method::Get, "get", &format!("p={phext}")).await
        else {
            return Ok(());
        };
        let doc = Doc::parse(&body).map_err(|e| malformed(&self.tenant, "get", e))?;
        world.model().check_doc(&self.tenant, phext, start, &doc, false)
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
        let model = world.model();
        for row in rows {
            let coord = row["coordinate"].as_str().and_then(|c| Coordinate::parse(c).ok());
            let (Some(coord), Some(scroll)) = (coord, row["scroll"].as_str()) else {
                return Err(malformed(&self.tenant, "query", "a row without coordinate or scroll"));
            };
            model.check_read(
                &self.tenant,
                &CellKey { phext: a.phext.clone(), coord },
                start,
                scroll,
                false,
            )?;
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

/// Two cells of one phext, sorted, or `None` if they are in different phexts.
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
