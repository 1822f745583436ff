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

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

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
    /// An insert's text: appended to whatever the cell held when it took effect.
    appended: Option<String>,
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
    /// Every quota the tenant was, or may have been, given, in bytes.
    quotas: BTreeSet<u64>,
    /// Every daily limit the tenant was, or may have been, given.
    daily_limits: BTreeSet<u64>,
    /// An upper bound of the units (requests, plus one per MiB moved) the tenant's clients sent.
    units_sent_max: u64,
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
    /// (session, tenant, cell) → the position, in the cell's writes, of the newest write the
    /// session has read there.
    sessions: BTreeMap<(u64, String, CellKey), usize>,
}

/// One MiB: what a request's bytes cost in units (`node::limits::REQUEST_UNIT_BYTES`).
const UNIT_BYTES: u64 = 1 << 20;

/// The fewest units that can empty a tenant's token bucket (`node::limits::BURST_CAPACITY`).
const BURST_UNITS_MIN: u64 = 2000;

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
        t.quotas.insert(quota_bytes);
    }

    /// Records that the tenant may now have a daily limit of `limit` requests.
    pub fn allow_daily_limit(&mut self, tenant: &str, limit: u64) {
        self.tenants.entry(tenant.to_string()).or_default().daily_limits.insert(limit);
    }

    /// Counts a request the tenant's clients send, carrying `bytes_in`, at its most units.
    pub fn sent(&mut self, tenant: &str, bytes_in: u64) {
        let t = self.tenants.entry(tenant.to_string()).or_default();
        // An answer is at most the tenant's data: its largest quota.
        let units = 1 + (bytes_in + t.quota_ceiling_bytes) / UNIT_BYTES;
        t.units_sent_max = t.units_sent_max.saturating_add(units);
    }

    /// Checks a 429: deserved only by a daily limit the tenant may have, reached by what its
    /// clients sent, or by a burst past what they sent in all.
    pub fn check_rate_limited(&self, tenant: &str, reason: &str) -> Result<(), Violation> {
        let Some(t) = self.tenants.get(tenant) else { return Ok(()) };
        let daily = reason
            .split("daily limit of ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse::<u64>().ok());
        let wrong = match daily {
            Some(limit) if !t.daily_limits.contains(&limit) => {
                Some(format!("a daily limit of {limit}, which it was never given"))
            }
            Some(limit) if t.units_sent_max < limit => Some(format!(
                "its daily limit of {limit}, after at most {} units sent",
                t.units_sent_max
            )),
            Some(_) => None,
            None if t.units_sent_max < BURST_UNITS_MIN => Some(format!(
                "a burst ({reason}), after at most {} units sent in all",
                t.units_sent_max
            )),
            None => None,
        };
        match wrong {
            Some(why) => Err(Violation::new(
                Invariant::WrongfulRefusal,
                format!("tenant {tenant} was refused 429 for {why}"),
            )),
            None => Ok(()),
        }
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
            appended: None,
            issued_ms: now_ms,
            horizon_ms,
            status: Status::Pending,
            acked_ms: 0,
        });
        self.writes.insert(id, WriteAt { tenant: tenant.to_string(), cell: cell.clone() });
        id
    }

    /// Marks write `id` as an insert of `text`. Its value is what it makes of the cell as the
    /// client knew it; while its outcome is open it may also land on top of a later write (a
    /// request held by a frozen node runs when the node resumes, whatever the client did
    /// meanwhile), so a read may find any later value with `text` after it.
    pub fn set_appended(&mut self, id: u64, text: &str) {
        let Some(at) = self.writes.get(&id) else { return };
        let w = self
            .tenants
            .get_mut(&at.tenant)
            .and_then(|t| t.cells.get_mut(&at.cell))
            .and_then(|ws| ws.iter_mut().find(|w| w.id == id));
        if let Some(w) = w {
            w.appended = Some(text.to_string());
        }
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
    pub fn allowed(&self, tenant: &str, cell: &CellKey, start_ms: u64) -> Vec<Cow<'_, str>> {
        let writes = self.writes(tenant, cell);
        let acked_before =
            |w: &Write| w.status == Status::Done(Outcome::Acked) && w.acked_ms < start_ms;
        let base = writes.iter().rev().find(|w| acked_before(w));
        let mut out = vec![base.map_or("", |w| w.value.as_str())];
        let mut late_inserts: Vec<&str> = Vec::new();
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
                if let (Some(text), false) = (&w.appended, w.status == Status::Done(Outcome::Acked))
                {
                    late_inserts.push(text);
                }
            }
        }
        let mut values: Vec<Cow<'_, str>> = out.iter().map(|v| Cow::Borrowed(*v)).collect();
        for text in late_inserts {
            values.extend(out.iter().map(|v| Cow::Owned(format!("{v}{text}"))));
        }
        values
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
        if allowed.iter().any(|v| v == observed) {
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

    /// The canonical length of all the tenant's phexts with every cell at one of the values a
    /// request started at `start_ms` may find there (the shortest each, or with `longest` the
    /// longest), and the cell `fixed` names holding its value.
    fn total_bytes(
        &self,
        tenant: &str,
        start_ms: u64,
        fixed: Option<(&CellKey, &str)>,
        longest: bool,
    ) -> u64 {
        let Some(t) = self.tenants.get(tenant) else { return 0 };
        let mut cells: Vec<&CellKey> = t.cells.keys().collect();
        if let Some((c, _)) = fixed.filter(|(c, _)| !t.cells.contains_key(*c)) {
            cells.push(c);
            cells.sort();
        }
        let mut total = 0u64;
        let mut at: Option<(&str, Coordinate)> = None;
        for cell in cells {
            let len = match fixed {
                Some((c, v)) if c == cell => v.len(),
                _ => {
                    let lens = self.allowed(tenant, cell, start_ms).into_iter().map(|v| v.len());
                    if longest {
                        lens.max().unwrap_or(0)
                    } else {
                        lens.min().unwrap_or(0)
                    }
                }
            } as u64;
            if len == 0 {
                continue;
            }
            let prev = match at {
                Some((phext, c)) if phext == cell.phext => c,
                _ => Coordinate::ORIGIN,
            };
            total += prev.breaks_to(&cell.coord) + len;
            at = Some((cell.phext.as_str(), cell.coord));
        }
        total
    }

    /// Checks a 507 the node gave a write of `value` to `cell`, started at `start_ms`, with its
    /// own account (`needed` bytes more, `free` of `quota` free): deserved only if the quota is
    /// one the tenant may have, the node's account adds up, and in some state the tenant may
    /// have been in, the write takes it past that quota.
    #[allow(clippy::too_many_arguments)]
    pub fn check_quota_refusal(
        &self,
        tenant: &str,
        cell: &CellKey,
        value: &str,
        start_ms: u64,
        needed: u64,
        free: u64,
        quota: u64,
    ) -> Result<(), Violation> {
        let Some(t) = self.tenants.get(tenant) else { return Ok(()) };
        let most_after = self.total_bytes(tenant, start_ms, Some((cell, value)), true);
        let wrong = if !t.quotas.contains(&quota) {
            Some(format!("a quota of {quota} bytes, which it was never given"))
        } else if needed <= free {
            Some(format!("{needed} bytes needed, {free} free: its own account says it fits"))
        } else if most_after <= quota {
            Some(format!("a quota of {quota} bytes; the write leaves at most {most_after} bytes"))
        } else {
            None
        };
        match wrong {
            Some(why) => Err(Violation::new(
                Invariant::WrongfulRefusal,
                format!(
                    "tenant {tenant}'s write to {}@{} ({} bytes) was refused 507 for {why}",
                    cell.phext,
                    cell.coord,
                    value.len()
                ),
            )),
            None => Ok(()),
        }
    }

    /// The tenant's size if `cell` held `value` and every other cell its shortest value now.
    pub fn bytes_with(&self, tenant: &str, cell: &CellKey, value: &str) -> u64 {
        self.total_bytes(tenant, u64::MAX, Some((cell, value)), false)
    }

    /// The one number of bytes the tenant holds now, if every cell is certain.
    pub fn certain_bytes(&self, tenant: &str) -> Option<u64> {
        let cells: Vec<&CellKey> = self.cells(tenant).collect();
        if cells.iter().any(|c| self.certain(tenant, c).is_none()) {
            return None;
        }
        Some(self.total_bytes(tenant, u64::MAX, None, false))
    }

    /// Monotonic reads: session `session` read `observed` in `cell`. Once a session has read a
    /// write there, it must never again read an older write that was acknowledged: that write
    /// took effect before the newer one was sent (each cell has one writer, who waits for each
    /// answer), so the cell went back in time. (An older write whose answer was lost may still
    /// land late, and the empty scroll is ambiguous: neither is held against it.)
    pub fn observe(
        &mut self,
        session: u64,
        tenant: &str,
        cell: &CellKey,
        observed: &str,
    ) -> Result<(), Violation> {
        if observed.is_empty() {
            return Ok(());
        }
        let writes = self.writes(tenant, cell);
        let Some(at) = writes.iter().position(|w| w.value == observed) else { return Ok(()) };
        let key = (session, tenant.to_string(), cell.clone());
        let newest = self.sessions.get(&key).copied();
        match newest {
            Some(newest) if at < newest => {
                let w = &writes[at];
                if w.status == Status::Done(Outcome::Acked) {
                    return Err(Violation::new(
                        Invariant::StaleRead,
                        format!(
                            "session {session} of tenant {tenant} read {}@{} and saw write #{}, acknowledged at {} ms, after it had read the newer write #{} there",
                            cell.phext, cell.coord, w.id, w.acked_ms, writes[newest].id
                        ),
                    ));
                }
            }
            _ => {
                self.sessions.insert(key, at);
            }
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
mod tests;
