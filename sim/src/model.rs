//! The expected state: what each cell (one coordinate of one phext of one tenant) may hold, given
//! only what clients were told. Pure data, so the checks can be tested on planted histories.
//!
//! Every cell has one writer at a time, and a writer waits for each answer, so acknowledged
//! writes of a cell are ordered. A write whose answer was lost ("unknown") may take effect at any
//! time up to its horizon (the last moment a delayed copy of it could reach a node), so it stays
//! a possible value until an acknowledged write issued after that horizon supersedes it.
//!
//! A read that started at `start` may see: the last write acknowledged before `start` (or the
//! empty scroll), any write acknowledged since, any write still in flight, and any unknown write
//! not yet superseded. Anything else breaks an invariant.

use std::collections::BTreeMap;

use proto::{Coordinate, Doc};

use crate::monitor::{Invariant, Violation};

/// One scroll of one phext.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct CellKey {
    pub phext: String,
    pub coord: Coordinate,
}

/// What a client learned of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Acked,
    /// A definite refusal: nothing was written.
    NotApplied,
    /// No answer, or one that does not say: it may or may not have been written.
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Pending,
    Done(Outcome),
}

#[derive(Debug, Clone)]
struct Write {
    id: u64,
    value: String,
    issued_ms: u64,
    horizon_ms: u64,
    status: Status,
    acked_ms: u64,
}

#[derive(Debug, Default)]
struct TenantModel {
    cells: BTreeMap<CellKey, Vec<Write>>,
    /// The largest quota the tenant was ever given (or may have been given), in bytes.
    quota_ceiling_bytes: u64,
}

/// Where a write is recorded.
#[derive(Debug, Clone)]
struct WriteAt {
    tenant: String,
    cell: CellKey,
}

#[derive(Debug, Default)]
pub struct Model {
    tenants: BTreeMap<String, TenantModel>,
    writes: BTreeMap<u64, WriteAt>,
    next_id: u64,
}

/// The tenant a write's text names: writes are tagged `<tenant#...>`.
pub fn tag(tenant: &str, unique: &str) -> String {
    format!("<{tenant}#{unique}>")
}

/// The tenants named by the tags in `text`.
fn tagged_tenants(text: &str) -> impl Iterator<Item = &str> {
    text.split('<').skip(1).filter_map(|part| part.split_once('#').map(|(tenant, _)| tenant))
}

impl Model {
    pub fn add_tenant(&mut self, tenant: &str, quota_bytes: u64) {
        let t = self.tenants.entry(tenant.to_string()).or_default();
        t.quota_ceiling_bytes = t.quota_ceiling_bytes.max(quota_bytes);
    }

    /// Records that the tenant may now have a quota of `quota_bytes`.
    pub fn allow_quota(&mut self, tenant: &str, quota_bytes: u64) {
        self.add_tenant(tenant, quota_bytes);
    }

    pub fn has_tenant(&self, tenant: &str) -> bool {
        self.tenants.contains_key(tenant)
    }

    /// Starts a write of `value` to `cell`; it may take effect until `horizon_ms`.
    pub fn begin_write(
        &mut self,
        tenant: &str,
        cell: &CellKey,
        value: String,
        now_ms: u64,
        horizon_ms: u64,
    ) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let writes = self
            .tenants
            .entry(tenant.to_string())
            .or_default()
            .cells
            .entry(cell.clone())
            .or_default();
        assert!(
            writes.iter().all(|w| w.status != Status::Pending),
            "two writers on one cell: the workload must give each cell one writer"
        );
        writes.push(Write {
            id,
            value,
            issued_ms: now_ms,
            horizon_ms,
            status: Status::Pending,
            acked_ms: 0,
        });
        self.writes.insert(id, WriteAt { tenant: tenant.to_string(), cell: cell.clone() });
        id
    }

    pub fn end_write(&mut self, id: u64, outcome: Outcome, now_ms: u64) {
        let Some(at) = self.writes.get(&id) else { return };
        let Some(w) = self
            .tenants
            .get_mut(&at.tenant)
            .and_then(|t| t.cells.get_mut(&at.cell))
            .and_then(|ws| ws.iter_mut().find(|w| w.id == id))
        else {
            return;
        };
        w.status = Status::Done(outcome);
        w.acked_ms = now_ms;
    }

    fn writes(&self, tenant: &str, cell: &CellKey) -> &[Write] {
        self.tenants.get(tenant).and_then(|t| t.cells.get(cell)).map_or(&[], Vec::as_slice)
    }

    /// The values a read of `cell` that started at `start_ms` may return.
    pub fn allowed(&self, tenant: &str, cell: &CellKey, start_ms: u64) -> Vec<&str> {
        let writes = self.writes(tenant, cell);
        let acked_before =
            |w: &Write| w.status == Status::Done(Outcome::Acked) && w.acked_ms < start_ms;
        let base = writes.iter().rev().find(|w| acked_before(w));
        let mut out = vec![base.map_or("", |w| w.value.as_str())];
        for w in writes {
            let possible = match w.status {
                Status::Pending => true,
                Status::Done(Outcome::Acked) => w.acked_ms >= start_ms,
                Status::Done(Outcome::Unknown) => {
                    !writes.iter().any(|a| acked_before(a) && a.issued_ms > w.horizon_ms)
                }
                Status::Done(Outcome::NotApplied) => false,
            };
            if possible {
                out.push(&w.value);
            }
        }
        out
    }

    /// The one value the cell can hold now, if only one is possible.
    pub fn certain(&self, tenant: &str, cell: &CellKey) -> Option<String> {
        let mut allowed = self.allowed(tenant, cell, u64::MAX);
        allowed.sort_unstable();
        allowed.dedup();
        (allowed.len() == 1).then(|| allowed[0].to_string())
    }

    /// Checks what a read of `cell`, started at `start_ms`, returned. `after_heal` names the
    /// final check, where a missing acknowledged write is a lost one rather than a stale read.
    pub fn check_read(
        &self,
        tenant: &str,
        cell: &CellKey,
        start_ms: u64,
        observed: &str,
        after_heal: bool,
    ) -> Result<(), Violation> {
        if let Some(other) = tagged_tenants(observed).find(|t| *t != tenant) {
            return Err(Violation::new(
                Invariant::Isolation,
                format!(
                    "tenant {tenant} read {}@{} and got data of tenant {other}",
                    cell.phext, cell.coord
                ),
            ));
        }
        let allowed = self.allowed(tenant, cell, start_ms);
        if allowed.contains(&observed) {
            return Ok(());
        }
        let writes = self.writes(tenant, cell);
        let seen = match writes.iter().find(|w| w.value == observed) {
            Some(w) => format!("write #{} ({:?}, issued at {} ms)", w.id, w.status, w.issued_ms),
            None if observed.is_empty() => "the empty scroll".to_string(),
            None => format!("{:?}, which no client wrote there", preview(observed)),
        };
        let latest = writes
            .iter()
            .rev()
            .find(|w| w.status == Status::Done(Outcome::Acked) && w.acked_ms < start_ms)
            .map_or("none".to_string(), |w| format!("#{} acknowledged at {} ms", w.id, w.acked_ms));
        let invariant = if after_heal { Invariant::LostWrite } else { Invariant::StaleRead };
        Err(Violation::new(
            invariant,
            format!(
                "tenant {tenant} read {}@{} at {start_ms} ms and saw {seen}; the latest acknowledged write is {latest}; {} value(s) were possible",
                cell.phext, cell.coord, allowed.len()
            ),
        ))
    }

    /// Checks a whole phext as `get` returned it: every cell the model knows, and no other scroll.
    pub fn check_doc(
        &self,
        tenant: &str,
        phext: &str,
        start_ms: u64,
        doc: &Doc,
        after_heal: bool,
    ) -> Result<(), Violation> {
        let known: Vec<&CellKey> = self.cells(tenant).filter(|c| c.phext == phext).collect();
        for cell in &known {
            self.check_read(tenant, cell, start_ms, doc.get(&cell.coord), after_heal)?;
        }
        for (coord, text) in doc.iter() {
            if !known.iter().any(|c| c.coord == *coord) {
                let cell = CellKey { phext: phext.to_string(), coord: *coord };
                self.check_read(tenant, &cell, start_ms, text, after_heal)?;
            }
        }
        Ok(())
    }

    /// The canonical bytes a phext holds now if every cell holds its certain value; `None` if
    /// any cell is uncertain.
    pub fn certain_canonical(&self, tenant: &str, phext: &str) -> Option<Vec<u8>> {
        let mut scrolls = Vec::new();
        for cell in self.cells(tenant).filter(|c| c.phext == phext) {
            scrolls.push((cell.coord, self.certain(tenant, cell)?));
        }
        let mut out = Vec::new();
        proto::doc::write_canonical(scrolls.iter().map(|(c, s)| (c, s.as_str())), &mut out);
        Some(out)
    }

    /// Checks that even the smallest state the tenant can be in fits its largest quota: the
    /// canonical length (scroll bytes plus the breaks between scrolls) of every phext with each
    /// cell at its shortest possible value.
    pub fn check_quota(&self, tenant: &str) -> Result<(), Violation> {
        let Some(t) = self.tenants.get(tenant) else { return Ok(()) };
        let mut least = 0u64;
        let mut at: Option<(&str, Coordinate)> = None;
        // Cells are ordered by phext, then coordinate: the order of each canonical document.
        for cell in t.cells.keys() {
            let allowed = self.allowed(tenant, cell, u64::MAX);
            let shortest = allowed.iter().map(|v| v.len()).min().unwrap_or(0) as u64;
            if shortest == 0 {
                continue;
            }
            let prev = match at {
                Some((phext, c)) if phext == cell.phext => c,
                _ => Coordinate::ORIGIN,
            };
            least += prev.breaks_to(&cell.coord) + shortest;
            at = Some((cell.phext.as_str(), cell.coord));
        }
        if least > t.quota_ceiling_bytes {
            return Err(Violation::new(
                Invariant::Quota,
                format!("tenant {tenant} holds at least {least} bytes, above the largest quota it ever had ({} bytes)", t.quota_ceiling_bytes),
            ));
        }
        Ok(())
    }

    /// Every cell ever written for the tenant.
    pub fn cells<'a>(&'a self, tenant: &str) -> impl Iterator<Item = &'a CellKey> + 'a {
        self.tenants.get(tenant).into_iter().flat_map(|t| t.cells.keys())
    }

    pub fn tenants(&self) -> impl Iterator<Item = &str> {
        self.tenants.keys().map(String::as_str)
    }
}

fn preview(text: &str) -> String {
    text.chars().take(40).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(n: u32) -> CellKey {
        CellKey {
            phext: "doc".into(),
            coord: Coordinate::from_components([1, 1, 1, 1, 1, 1, 1, 1, n]).unwrap(),
        }
    }

    fn write(m: &mut Model, c: &CellKey, value: &str, at: u64, outcome: Outcome) -> u64 {
        let id = m.begin_write("t1", c, value.to_string(), at, at + 100);
        m.end_write(id, outcome, at + 10);
        id
    }

    // Goal: the checker fails on a planted lost write: after `b` was acknowledged, a read that
    // returns the older `a` (or nothing) is reported; the acknowledged value passes.
    #[test]
    fn a_planted_lost_write_is_caught() {
        let mut m = Model::default();
        m.add_tenant("t1", 1 << 20);
        let c = cell(1);
        write(&mut m, &c, "<t1#a>", 0, Outcome::Acked);
        write(&mut m, &c, "<t1#b>", 20, Outcome::Acked);
        assert!(m.check_read("t1", &c, 40, "<t1#b>", false).is_ok());
        let stale = m.check_read("t1", &c, 40, "<t1#a>", false).unwrap_err();
        assert_eq!(stale.invariant, Invariant::StaleRead);
        let lost = m.check_read("t1", &c, 40, "", true).unwrap_err();
        assert_eq!(lost.invariant, Invariant::LostWrite);
        // A read that started before `b` was acknowledged may still see `a`.
        assert!(m.check_read("t1", &c, 25, "<t1#a>", false).is_ok());
    }

    // Goal: an unknown write stays possible until an acknowledged write issued after its horizon
    // supersedes it; a refused write is never possible.
    #[test]
    fn unknown_writes_until_superseded() {
        let mut m = Model::default();
        let c = cell(2);
        write(&mut m, &c, "<t1#a>", 0, Outcome::Acked);
        write(&mut m, &c, "<t1#u>", 20, Outcome::Unknown);
        write(&mut m, &c, "<t1#n>", 40, Outcome::NotApplied);
        assert!(m.check_read("t1", &c, 60, "<t1#u>", false).is_ok());
        assert!(m.check_read("t1", &c, 60, "<t1#n>", false).is_err());
        write(&mut m, &c, "<t1#b>", 60, Outcome::Acked);
        assert!(
            m.check_read("t1", &c, 80, "<t1#u>", false).is_ok(),
            "b was issued before u's horizon"
        );
        write(&mut m, &c, "<t1#c>", 200, Outcome::Acked);
        assert!(
            m.check_read("t1", &c, 300, "<t1#u>", false).is_err(),
            "c, issued after u's horizon, supersedes it"
        );
        assert_eq!(m.certain("t1", &c).as_deref(), Some("<t1#c>"));
    }

    // Goal: another tenant's data is reported as an isolation breach, and a tenant past its
    // largest quota as a quota breach.
    #[test]
    fn isolation_and_quota_are_checked() {
        let mut m = Model::default();
        m.add_tenant("t1", 64);
        let c = cell(3);
        let breach = m.check_read("t1", &c, 0, "<t2#x>", false).unwrap_err();
        assert_eq!(breach.invariant, Invariant::Isolation);
        write(&mut m, &c, &format!("<t1#big>{}", "x".repeat(100)), 0, Outcome::Acked);
        assert_eq!(m.check_quota("t1").unwrap_err().invariant, Invariant::Quota);
        m.allow_quota("t1", 1 << 20);
        assert!(m.check_quota("t1").is_ok());
    }
}
