//! Running one request on a tenant: the checks a request passes first ([`validate`]), the
//! executor for every route ([`run`]), and a write in two steps (logged, then durable) so that
//! writers share a log batch ([`Store::execute_begin`], [`Store::execute_finish`]). Loading,
//! unloading and eviction, which a request may trigger, live in the parent module.

use std::sync::Arc;

use proto::request::{Selector, BODY_BYTES_MAX, DELTA_LINES_MAX, QUERY_SET_MAX, SQ_API_VERSION};
use proto::{ops, Coordinate, PhextName, SqRequest, SqResponse};

use super::tenant::{Edit, Tenant};
use super::{check_tenant_id, Store, StoreError};

impl Store {
    /// Runs one request for `tenant`, whose quota is `quota_bytes`. A write is answered only once
    /// it is durable; a read only once everything it saw is durable. Reads create nothing.
    pub fn execute(
        &self,
        tenant: &str,
        quota_bytes: u64,
        req: &SqRequest,
    ) -> Result<SqResponse, StoreError> {
        match self.execute_begin(tenant, quota_bytes, req) {
            Begun::Done(result) => result,
            Begun::Logged(logged) => self.execute_finish(logged),
        }
    }

    /// [`Self::execute`] in two halves. This one runs the request up to its effect: a read or a
    /// refusal is answered; a write is applied in memory and its record added to the log's
    /// pending batch, and [`Self::execute_finish`] answers it once the record is durable. Other
    /// writers' records may join the batch meanwhile, and a checkpoint may flush it.
    pub fn execute_begin(&self, tenant: &str, quota_bytes: u64, req: &SqRequest) -> Begun {
        self.execute_begin_led(tenant, quota_bytes, req, None)
    }

    /// [`Self::execute_begin`] for the primary of a replicated tenant that leads it under
    /// `led`: a write is refused ([`StoreError::NotLeading`]), changing nothing, once this
    /// replica promised a newer ballot (it took a newer primary's records, or promised it),
    /// whatever this node still believes. Its record would otherwise join the newer primary's
    /// run in the ballot history, at an lsn where that primary wrote another.
    pub fn execute_begin_led(
        &self,
        tenant: &str,
        quota_bytes: u64,
        req: &SqRequest,
        led: Option<u64>,
    ) -> Begun {
        let result = check_tenant_id(tenant)
            .and_then(|()| validate(req))
            .and_then(|()| self.execute_valid(tenant, quota_bytes, req, led));
        match result {
            Ok(Ran::Answered(response)) => Begun::Done(Ok(response)),
            Ok(Ran::Logged(logged)) => Begun::Logged(logged),
            Err(e) => Begun::Done(Err(failed(tenant, req.route().name(), e))),
        }
    }

    /// The second half of a write begun by [`Self::execute_begin`]: its answer, once its log
    /// record ([`Logged::lsn`]) is durable.
    pub fn execute_finish(&self, logged: Logged) -> Result<SqResponse, StoreError> {
        let Logged { tenant: t, lsn, answer, route, .. } = logged;
        match t.wait_durable(lsn) {
            Ok(()) => {
                self.after_request(&t);
                Ok(SqResponse::text(answer))
            }
            Err(e) => {
                if matches!(e, StoreError::Io { .. }) {
                    self.discard(&t.id, &t);
                }
                Err(failed(&t.id, route, e))
            }
        }
    }

    /// Answers a `select` or `version` at once, from memory, if it needs neither the disk nor a
    /// wait: the tenant is loaded, no lock it needs is taken, its log is healthy, and what the
    /// read sees is durable. `None`
    /// otherwise, and for every other request: run those with [`Self::execute`], off the async
    /// threads. Selects are the hot read path and cost one scroll, so they may run inline.
    pub fn execute_now(
        &self,
        tenant: &str,
        req: &SqRequest,
    ) -> Option<Result<SqResponse, StoreError>> {
        let (p, c) = match req {
            SqRequest::Version => return Some(Ok(SqResponse::text(SQ_API_VERSION))),
            SqRequest::Select { p, c } => (p, c),
            _ => return None,
        };
        if let Err(e) = validate(req) {
            return Some(Err(e));
        }
        let t = self.try_loaded_whole(tenant)?;
        if t.log_failed() {
            return None;
        }
        let body = t.read_now(p, |d| d.get(c).as_bytes().to_vec())?;
        t.touch(self.clock.now_ms());
        Some(Ok(SqResponse::text(body)))
    }

    fn execute_valid(
        &self,
        id: &str,
        quota_bytes: u64,
        req: &SqRequest,
        led: Option<u64>,
    ) -> Result<Ran, StoreError> {
        if req.phext().is_none() {
            return Ok(Ran::Answered(SqResponse::text(SQ_API_VERSION)));
        }
        self.on_loaded(id, |t| {
            let ran = run(t, quota_bytes, req, led)?;
            // A logged write's upkeep comes once it is durable (`execute_finish`).
            if let Some(Ran::Answered(_)) = ran {
                self.after_request(t);
            }
            Ok(ran)
        })
    }

    /// Upkeep after a request: a checkpoint if the tenant's log is long, eviction if the store is
    /// over its limits. Failures here are logged, not returned: the request itself succeeded.
    pub(super) fn after_request(&self, t: &Arc<Tenant>) {
        if let Err(e) = t.checkpoint_if_over(self.config.checkpoint_wal_bytes) {
            tracing::warn!(tenant = %t.id, error = %e, "checkpoint failed; the log keeps every change");
        }
        if self.over_limits() {
            self.evict(Some(&t.id));
        }
    }
}

/// Logs a store failure other than a quota refusal (the client's doing), and returns it.
fn failed(tenant: &str, route: &str, e: StoreError) -> StoreError {
    if !matches!(e, StoreError::QuotaExceeded { .. } | StoreError::NotLeading { .. }) {
        tracing::warn!(tenant, route, error = %e, "store request failed");
    }
    e
}

/// What [`Store::execute_begin`] did.
pub enum Begun {
    /// The request is answered (or refused).
    Done(Result<SqResponse, StoreError>),
    /// A write is applied in memory and logged, not yet durable: [`Store::execute_finish`].
    Logged(Logged),
}

/// A write whose log record is not yet known to be durable, and its answer.
pub struct Logged {
    tenant: Arc<Tenant>,
    lsn: u64,
    answer: String,
    route: &'static str,
    changed: bool,
}

impl Logged {
    /// The record the answer waits for: the write's own, or for a write that changed nothing,
    /// the last record of the phext it saw.
    pub fn lsn(&self) -> u64 {
        self.lsn
    }

    /// Whether the write logged a record. One that changed nothing answers from what it read,
    /// as a read does (with replication, under the primary's lease).
    pub fn changed(&self) -> bool {
        self.changed
    }
}

/// What [`run`] did on a loaded tenant.
enum Ran {
    Answered(SqResponse),
    Logged(Logged),
}

/// The largest answer that travels whole, in one message to the gateway: a message's limit less
/// room for its envelope. `get`, `toc` and `query` answers are sized before they are built, and
/// one past this is refused with a final error rather than built and then failing to send.
const WHOLE_ANSWER_BYTES_MAX: u64 = (proto::wire::MESSAGE_BYTES_MAX - (1 << 20)) as u64;

/// Checks a sized answer against [`WHOLE_ANSWER_BYTES_MAX`] before it is built.
fn sized(answer_bytes: u64) -> Result<(), StoreError> {
    if answer_bytes > WHOLE_ANSWER_BYTES_MAX {
        return Err(StoreError::AnswerTooLarge {
            answer_bytes,
            limit_bytes: WHOLE_ANSWER_BYTES_MAX,
        });
    }
    Ok(())
}

/// Runs a validated request on a loaded tenant; `Ok(None)` when the tenant closed under a write.
fn run(
    t: &Arc<Tenant>,
    quota_bytes: u64,
    req: &SqRequest,
    led: Option<u64>,
) -> Result<Option<Ran>, StoreError> {
    let plain = |body: Vec<u8>| SqResponse::text(body);
    let response = match req {
        SqRequest::Version => return Ok(Some(Ran::Answered(SqResponse::text(SQ_API_VERSION)))),
        SqRequest::Select { p, c } => t.read(p, |d| plain(d.get(c).as_bytes().to_vec()))?,
        SqRequest::Toc { p } => {
            t.read(p, |d| sized(ops::toc_len(d)).map(|_| plain(ops::toc(d).into_bytes())))??
        }
        SqRequest::Get { p } => {
            t.read(p, |d| sized(d.canonical_len()).map(|_| plain(d.to_canonical())))??
        }
        SqRequest::Checksum { p } => t.read(p, |d| plain(ops::doc_checksum(d).into_bytes()))?,
        SqRequest::Delta { p, manifest } => t.read(p, |d| {
            // Sized first: a few listed coordinates far from the origin cost megabytes each.
            let answer_bytes = ops::delta_len(d, manifest);
            if answer_bytes > ops::ANSWER_BYTES_MAX {
                return Err(StoreError::AnswerTooLarge {
                    answer_bytes,
                    limit_bytes: ops::ANSWER_BYTES_MAX,
                });
            }
            Ok(plain(ops::delta(d, manifest)))
        })??,
        SqRequest::Query { p, selector, limit } => t.read(p, |d| {
            sized(ops::query_len(d, selector, *limit))
                .map(|_| SqResponse { body: ops::query(d, selector, *limit), json: true })
        })??,
        SqRequest::Status { p } => t.read(p, |d| plain(ops::status(p.as_str(), d).into_bytes()))?,
        SqRequest::Load { p } => t.read(p, |_| plain(ops::loaded(p.as_str()).into_bytes()))?,
        SqRequest::JsonExport { p } => t.read(p, |d| {
            sized(ops::json_export_len(d))
                .map(|_| SqResponse { body: ops::json_export(d).into_bytes(), json: true })
        })??,
        SqRequest::Where { text, algo, limit, .. } => {
            plain(ops::where_(text, *algo, *limit).into_bytes())
        }
        SqRequest::Insert { p, c, text } => {
            return write(t, p, *c, Edit::Insert(text), quota_bytes, req.route().name(), led)
        }
        SqRequest::Update { p, c, text } => {
            return write(t, p, *c, Edit::Update(text), quota_bytes, req.route().name(), led)
        }
        SqRequest::Delete { p, c } => {
            return write(t, p, *c, Edit::Delete, quota_bytes, req.route().name(), led)
        }
    };
    Ok(Some(Ran::Answered(response)))
}

fn write(
    t: &Arc<Tenant>,
    p: &PhextName,
    c: Coordinate,
    edit: Edit<'_>,
    quota: u64,
    route: &'static str,
    led: Option<u64>,
) -> Result<Option<Ran>, StoreError> {
    Ok(t.write_logged(p, c, edit, quota, led)?.map(|(answer, lsn, changed)| {
        Ran::Logged(Logged { tenant: t.clone(), lsn, answer, route, changed })
    }))
}

/// Refuses what `proto::request::parse` would have refused. Requests reach the node over the
/// wire, where serde builds names and coordinates without their checks; one that slipped through
/// could name a file outside the tenant or trip the document's invariants.
pub(super) fn validate(req: &SqRequest) -> Result<(), StoreError> {
    let bad = |detail: String| Err(StoreError::InvalidRequest(detail));
    if let Some(p) = req.phext() {
        if PhextName::parse(p.as_str()).is_err() {
            return bad("invalid phext name".into());
        }
    }
    let coord = |c: &Coordinate| {
        Coordinate::from_components(c.components())
            .map(|_| ())
            .map_err(|e| StoreError::InvalidRequest(e.to_string()))
    };
    match req {
        SqRequest::Select { c, .. } | SqRequest::Delete { c, .. } => coord(c),
        SqRequest::Insert { c, text, .. } | SqRequest::Update { c, text, .. } => {
            coord(c)?;
            if text.len() > BODY_BYTES_MAX {
                return bad(format!("text exceeds {BODY_BYTES_MAX} bytes"));
            }
            if proto::doc::contains_break(text) {
                return bad("text contains phext dimension breaks".into());
            }
            Ok(())
        }
        SqRequest::Delta { manifest, .. } if manifest.len() > DELTA_LINES_MAX => {
            bad("delta manifest too long".into())
        }
        SqRequest::Delta { manifest, .. } => manifest.iter().try_for_each(|(c, _)| coord(c)),
        SqRequest::Query { selector: Selector { set, .. }, .. } if set.len() > QUERY_SET_MAX => {
            bad("query set too long".into())
        }
        SqRequest::Query { selector: Selector { set, .. }, .. }
            if set.windows(2).any(|w| w[0] >= w[1]) =>
        {
            bad("query set not sorted".into())
        }
        SqRequest::Query { selector: Selector { range, set }, .. } => {
            range.iter().try_for_each(|(from, to)| coord(from).and_then(|_| coord(to)))?;
            set.iter().try_for_each(coord)
        }
        SqRequest::Where { text, .. } if text.len() > BODY_BYTES_MAX => {
            bad(format!("text exceeds {BODY_BYTES_MAX} bytes"))
        }
        SqRequest::Version
        | SqRequest::Toc { .. }
        | SqRequest::Get { .. }
        | SqRequest::Checksum { .. }
        | SqRequest::Status { .. }
        | SqRequest::Load { .. }
        | SqRequest::JsonExport { .. }
        | SqRequest::Where { .. } => Ok(()),
    }
}
