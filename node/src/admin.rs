//! Admin operations on a node: checked against the admin key hash, written through the registry
//! leader (forwarded when this node is a follower), answered typed ([`AdminAnswer`]); the gateway
//! renders the JSON.

use std::time::Duration;

use proto::admin::{AdminAnswer, TenantInfo, TenantStatus};
use proto::cluster::{
    AdminOp, NodeRequest, NodeResponse, NodeView, RegistryView, TenantView, MIB, TENANTS_PAGE_MAX,
};
use proto::ApiError;
use raft_registry::{
    Command, RegistryError, RegistryState, TenantRecord, Tier, ADMIN_EMAIL_LEN_MAX,
    NODE_ADDR_LEN_MAX,
};

use crate::gossip::Health;
use crate::service::{Service, PEER_CALL_TIMEOUT};

/// How long a follower waits to apply an entry its leader has committed before answering.
const APPLY_WAIT: Duration = Duration::from_secs(2);

/// How long the leader gives a joining node to answer over QUIC (handshake with the cluster's
/// certificates, then one call) before refusing the join: a few WAN round trips and a TLS
/// handshake, well under an operator's patience. Nothing is recorded before it answers.
const JOIN_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs one admin operation. Returns the answer and the registry index applied here.
pub async fn execute(
    svc: &Service,
    admin_key_hash: &str,
    op: AdminOp,
) -> (Result<AdminAnswer, ApiError>, u64) {
    let result = run(svc, admin_key_hash, op).await;
    (result, svc.registry.subscribe().borrow().0)
}

async fn run(svc: &Service, admin_key_hash: &str, op: AdminOp) -> Result<AdminAnswer, ApiError> {
    let state = svc.registry.state();
    if state.admin_key_hash() != Some(admin_key_hash) {
        return Err(ApiError::Unauthorized);
    }
    match op {
        AdminOp::ListTenants => {
            if state.tenant_count() as u64 > TENANTS_UNPAGED_MAX {
                return Err(ApiError::bad_request(format!(
                    "{} tenants, more than {TENANTS_UNPAGED_MAX} in one answer: page with \
                     limit= and after=",
                    state.tenant_count()
                )));
            }
            Ok(AdminAnswer::Tenants(state.tenants().map(tenant_info).collect()))
        }
        AdminOp::ListTenantsPage { limit, after, tier: t, status, node } => {
            let filter = PageFilter::new(limit, tier(t.as_deref())?, status.as_deref(), node)?;
            Ok(tenants_page(&state, after.as_deref(), &filter))
        }
        AdminOp::GetTenant { tenant_id } => {
            Ok(AdminAnswer::Tenant(tenant_info(known(&state, &tenant_id)?)))
        }
        AdminOp::TenantStats { tenant_id } => {
            Ok(AdminAnswer::TenantStats(crate::stats::tenant_stats(svc, &state, &tenant_id).await?))
        }
        AdminOp::Health => Ok(AdminAnswer::Health(Box::new(crate::stats::health(svc, &state)))),
        AdminOp::ListNodes => Ok(AdminAnswer::Nodes(crate::stats::nodes(svc, &state))),
        AdminOp::AddNode { id, addr } => {
            membership(svc, admin_key_hash, AdminOp::AddNode { id, addr }).await
        }
        AdminOp::RemoveNode { id } => {
            membership(svc, admin_key_hash, AdminOp::RemoveNode { id }).await
        }
        AdminOp::DrainNode { id } => {
            membership(svc, admin_key_hash, AdminOp::DrainNode { id }).await
        }
        AdminOp::SetReplicas { replicas } => {
            let replicas = u8::try_from(replicas)
                .ok()
                .filter(|r| (1..=raft_registry::REPLICAS_MAX).contains(r))
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "replicas must be 1 to {}",
                        raft_registry::REPLICAS_MAX
                    ))
                })?;
            commit(svc, Command::ChangeReplicas { replicas }).await?;
            Ok(AdminAnswer::Health(Box::new(crate::stats::health(svc, &svc.registry.state()))))
        }
        AdminOp::PurgeTenant { tenant_id } => {
            if !state.is_purged(&tenant_id) {
                known(&state, &tenant_id)?;
            }
            commit(svc, Command::PurgeTenant { id: tenant_id.clone() }).await?;
            Ok(AdminAnswer::Purged { tenant_id })
        }
        write @ (AdminOp::AddTenant { .. }
        | AdminOp::PatchTenant { .. }
        | AdminOp::RotateKey { .. }
        | AdminOp::DeleteTenant { .. }) => {
            let command = command_for(&state, write, svc.wall_ms())?;
            let id = command_tenant(&command);
            commit(svc, command).await?;
            let state = svc.registry.state();
            Ok(AdminAnswer::Tenant(tenant_info(known(&state, &id)?)))
        }
    }
}

/// The most tenants listed in one answer without paging: the whole list of a large registry
/// would not fit one message (about 170 B of JSON per tenant, and of the same order on the wire,
/// against 64 MiB).
const TENANTS_UNPAGED_MAX: u64 = 10_000;

/// Which tenants a page lists, checked.
struct PageFilter {
    limit: usize,
    tier: Option<Tier>,
    status: Option<TenantStatus>,
    node: Option<u64>,
}

impl PageFilter {
    fn new(
        limit: u64,
        tier: Option<Tier>,
        status: Option<&str>,
        node: Option<u64>,
    ) -> Result<PageFilter, ApiError> {
        if !(1..=TENANTS_PAGE_MAX).contains(&limit) {
            return Err(ApiError::bad_request(format!("limit must be 1 to {TENANTS_PAGE_MAX}")));
        }
        let status = status
            .map(|s| {
                TenantStatus::parse(s).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "unknown status {s:?}: use active, disabled or archived"
                    ))
                })
            })
            .transpose()?;
        Ok(PageFilter { limit: limit as usize, tier, status, node })
    }

    fn admits(&self, state: &RegistryState, t: &TenantRecord) -> bool {
        self.tier.is_none_or(|tier| t.tier == tier)
            && self.status.is_none_or(|s| s == status_of(t))
            && self.node.is_none_or(|n| state.owner_of(&t.id) == Some(n))
    }
}

/// One page, `next_after` naming the cursor of the next page when more tenants may follow.
fn tenants_page(state: &RegistryState, after: Option<&str>, filter: &PageFilter) -> AdminAnswer {
    let mut matching = state.tenants_after(after).filter(|t| filter.admits(state, t));
    let page: Vec<&TenantRecord> = matching.by_ref().take(filter.limit).collect();
    let more = matching.next().is_some();
    let next_after = page.last().filter(|_| more).map(|t| t.id.clone());
    AdminAnswer::TenantsPage { tenants: page.into_iter().map(tenant_info).collect(), next_after }
}

fn status_of(t: &TenantRecord) -> TenantStatus {
    if t.archived {
        TenantStatus::Archived
    } else if t.enabled {
        TenantStatus::Active
    } else {
        TenantStatus::Disabled
    }
}

pub(crate) fn known<'a>(state: &'a RegistryState, id: &str) -> Result<&'a TenantRecord, ApiError> {
    state.tenant(id).ok_or_else(|| ApiError::Missing(format!("tenant {id:?} does not exist")))
}

fn tier(name: Option<&str>) -> Result<Option<Tier>, ApiError> {
    name.map(|n| {
        Tier::parse(n).ok_or_else(|| {
            ApiError::bad_request(format!("unknown tier {n:?}: use free, pro or team"))
        })
    })
    .transpose()
}

/// Turns a tenant-changing admin operation into a registry command, checking its input first.
fn command_for(state: &RegistryState, op: AdminOp, now_ms: u64) -> Result<Command, ApiError> {
    Ok(match op {
        AdminOp::AddTenant { tenant_id, tier: t, quota_mb, admin_email, key_hash } => {
            if !proto::auth::valid_tenant_id(&tenant_id) {
                return Err(ApiError::bad_request("tenant_id must match [a-z0-9][a-z0-9-]{0,62}"));
            }
            if admin_email.as_ref().is_some_and(|e| e.len() > ADMIN_EMAIL_LEN_MAX) {
                return Err(ApiError::bad_request(format!(
                    "admin_email is longer than {ADMIN_EMAIL_LEN_MAX} bytes"
                )));
            }
            if state.tenant(&tenant_id).is_some() {
                return Err(ApiError::Conflict(format!("tenant {tenant_id} exists")));
            }
            let tier = tier(t.as_deref())?.unwrap_or(Tier::Free);
            Command::AddTenant(TenantRecord {
                id: tenant_id,
                tier,
                quota_bytes: quota_mb
                    .map_or(tier.default_quota_bytes(), |mb| mb.saturating_mul(MIB)),
                daily_limit: tier.default_daily_limit(),
                key_hashes: vec![key_hash],
                enabled: true,
                archived: false,
                created_at_ms: now_ms,
                admin_email,
            })
        }
        AdminOp::PatchTenant { tenant_id, tier: t, quota_mb, enabled, daily_limit } => {
            known(state, &tenant_id)?;
            Command::UpdateTenant {
                id: tenant_id,
                tier: tier(t.as_deref())?,
                quota_bytes: quota_mb.map(|mb| mb.saturating_mul(MIB)),
                daily_limit,
                enabled,
            }
        }
        AdminOp::RotateKey { tenant_id, key_hash } => {
            known(state, &tenant_id)?;
            Command::RotateKey { id: tenant_id, new_hash: key_hash }
        }
        AdminOp::DeleteTenant { tenant_id } => {
            known(state, &tenant_id)?;
            Command::ArchiveTenant { id: tenant_id }
        }
        other => return Err(ApiError::Internal(format!("{other:?} is not a tenant write"))),
    })
}

fn command_tenant(c: &Command) -> String {
    match c {
        Command::AddTenant(r) => r.id.clone(),
        Command::UpdateTenant { id, .. }
        | Command::RotateKey { id, .. }
        | Command::ArchiveTenant { id } => id.clone(),
        _ => String::new(),
    }
}

/// Commits on the leader; a follower forwards the command to the leader and waits until it has
/// applied the change itself. Admin changes (the admin key already checked here) and handoff
/// commits both go this way.
pub(crate) async fn commit(svc: &Service, command: Command) -> Result<(), ApiError> {
    match svc.registry.write(command.clone()).await {
        Ok(_) => Ok(()),
        Err(RegistryError::NotLeader { leader_addr: Some(addr), .. }) => {
            forward_to_leader(
                svc,
                &addr,
                NodeRequest::RaftCommand { command: encode_command(&command)? },
            )
            .await
        }
        Err(e) => Err(registry_error(e)),
    }
}

fn encode_command(c: &Command) -> Result<Vec<u8>, ApiError> {
    proto::wire::encode(c).map_err(|e| ApiError::Internal(e.to_string()))
}

async fn forward_to_leader(
    svc: &Service,
    leader: &str,
    request: NodeRequest,
) -> Result<(), ApiError> {
    let addr = leader
        .parse()
        .map_err(|_| ApiError::Internal(format!("leader address {leader:?} is invalid")))?;
    let bytes = proto::wire::encode(&request).map_err(|e| ApiError::Internal(e.to_string()))?;
    let answer = svc
        .peers
        .call(addr, bytes.into(), PEER_CALL_TIMEOUT)
        .await
        .map_err(|e| ApiError::unavailable(format!("registry leader unreachable: {e}")))?;
    match proto::wire::decode::<NodeResponse>(&answer) {
        Ok(NodeResponse::Admin { result, applied_index }) => {
            result?;
            wait_applied(svc, applied_index).await;
            Ok(())
        }
        Ok(other) => Err(ApiError::Internal(format!("leader answered {other:?}"))),
        Err(e) => Err(ApiError::Internal(e.to_string())),
    }
}

/// Waits (bounded) until this node has applied `index`, so its answer already shows the change.
pub(crate) async fn wait_applied(svc: &Service, index: u64) {
    let mut rx = svc.registry.subscribe();
    let _ = tokio::time::timeout(APPLY_WAIT, async {
        while rx.borrow_and_update().0 < index {
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
}

/// A command forwarded by another node (mutually authenticated): commit it here, on the leader.
pub async fn commit_forwarded(
    svc: &Service,
    command: &[u8],
) -> (Result<AdminAnswer, ApiError>, u64) {
    let result = async {
        let command: Command =
            proto::wire::decode(command).map_err(|e| ApiError::bad_request(e.to_string()))?;
        svc.registry.write(command).await.map_err(registry_error)?;
        Ok(AdminAnswer::Committed)
    }
    .await;
    (result, svc.registry.subscribe().borrow().0)
}

/// A joining node's address as the registry will keep it: `host:port` with an IP host.
fn parse_node_addr(id: u64, addr: &str) -> Result<std::net::SocketAddr, ApiError> {
    if addr.len() > NODE_ADDR_LEN_MAX {
        return Err(ApiError::bad_request(format!(
            "node {id}: addr is longer than {NODE_ADDR_LEN_MAX} bytes"
        )));
    }
    addr.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "node {id}: addr {addr:?} is not an IP address and port such as 10.0.0.4:7100"
        ))
    })
}

/// Reaches a joining node over QUIC with the cluster's certificates and checks it runs as `id`,
/// all within [`JOIN_PROBE_TIMEOUT`]. Runs before anything of the join is recorded.
async fn probe_joining_node(
    svc: &Service,
    id: u64,
    addr: std::net::SocketAddr,
) -> Result<(), ApiError> {
    let request = proto::wire::encode(&NodeRequest::Identify)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let refuse = |why: String| {
        ApiError::Conflict(format!("node {id} at {addr}: {why}; nothing was recorded"))
    };
    let answer = svc.peers.call(addr, request.into(), JOIN_PROBE_TIMEOUT).await.map_err(|e| {
        refuse(format!(
            "not reachable over QUIC with the cluster's certificates within {} s ({e})",
            JOIN_PROBE_TIMEOUT.as_secs()
        ))
    })?;
    match proto::wire::decode::<NodeResponse>(&answer) {
        Ok(NodeResponse::Identity { id: theirs }) if theirs == id => Ok(()),
        Ok(NodeResponse::Identity { id: theirs }) => {
            Err(refuse(format!("the node there runs as node {theirs}, not {id}")))
        }
        Ok(other) => Err(refuse(format!("answered {other:?} instead of its id"))),
        Err(e) => Err(refuse(format!("answered something unreadable: {e}"))),
    }
}

/// Membership changes run on the leader, one at a time.
async fn membership(
    svc: &Service,
    admin_key_hash: &str,
    op: AdminOp,
) -> Result<AdminAnswer, ApiError> {
    if let AdminOp::AddNode { id, addr } = &op {
        parse_node_addr(*id, addr)?;
    }
    // Refused before anything is recorded: the registry refuses the activation or drain itself
    // (raft_registry::Rejection::TooFewNodesForReplicas), which would leave a join half done.
    let state = svc.registry.state();
    let (replicas, active) = (state.replicas(), state.active_nodes().len());
    let too_few = matches!(op, AdminOp::DrainNode { .. }) && active <= replicas;
    if replicas > 1 && too_few {
        let refused =
            raft_registry::Rejection::TooFewNodesForReplicas { replicas: replicas as u8, active };
        return Err(ApiError::Conflict(refused.to_string()));
    }
    let status = svc.registry.status();
    if status.leader != Some(svc.id) {
        let leader =
            status.leader.and_then(|l| svc.registry.state().node(l).map(|n| n.addr.clone()));
        let Some(addr) = leader else {
            return Err(ApiError::unavailable("no registry leader"));
        };
        forward_to_leader(
            svc,
            &addr,
            NodeRequest::Admin { admin_key_hash: admin_key_hash.to_string(), op },
        )
        .await?;
        return Ok(AdminAnswer::Nodes(crate::stats::nodes(svc, &svc.registry.state())));
    }
    match op {
        AdminOp::AddNode { id, addr } => {
            let parsed = parse_node_addr(id, &addr)?;
            let state = svc.registry.state();
            // A retry of a join already recorded goes on without a new probe; any other use of
            // the id is refused by the registry.
            if state.node(id).is_none() {
                probe_joining_node(svc, id, parsed).await?;
            }
            svc.registry.join_node(id, addr).await.map_err(registry_error)?
        }
        AdminOp::DrainNode { id } => svc.registry.drain_node(id).await.map_err(registry_error)?,
        AdminOp::RemoveNode { id } => svc.registry.remove_node(id).await.map_err(registry_error)?,
        other => return Err(ApiError::Internal(format!("{other:?} is not a membership change"))),
    };
    Ok(AdminAnswer::Nodes(crate::stats::nodes(svc, &svc.registry.state())))
}

/// Registry errors as API errors: rejections are the caller's fault, the rest are ours.
pub fn registry_error(e: RegistryError) -> ApiError {
    match e {
        RegistryError::Rejected(reason) => ApiError::Conflict(reason.to_string()),
        RegistryError::NotLeader { .. } => ApiError::unavailable("no registry leader"),
        RegistryError::MembershipChangeInProgress => ApiError::Conflict(
            "another membership change is in progress (a join that never finishes can be \
             cancelled by removing its node)"
                .into(),
        ),
        e @ RegistryError::JoinCancelled(_) => ApiError::Conflict(e.to_string()),
        other => ApiError::unavailable(other.to_string()),
    }
}

/// A tenant's record as admin answers carry it.
pub fn tenant_info(t: &TenantRecord) -> TenantInfo {
    TenantInfo {
        tenant_id: t.id.clone(),
        tier: t.tier,
        quota_bytes: t.quota_bytes,
        daily_limit: t.daily_limit,
        status: status_of(t),
        created_at_ms: t.created_at_ms,
        admin_email: t.admin_email.clone(),
        key_hashes: t.key_hashes.clone(),
    }
}

/// The registry as gateways see it.
pub fn registry_view(
    applied_index: u64,
    state: &RegistryState,
    health: &Health,
    leader: Option<u64>,
    term: u64,
) -> RegistryView {
    RegistryView {
        tenants: state.tenants().map(|t| tenant_view(state, t)).collect(),
        ..registry_head(applied_index, state, health, leader, term)
    }
}

/// [`registry_view`] without its tenants: what every answer to a gateway carries whole.
pub fn registry_head(
    applied_index: u64,
    state: &RegistryState,
    health: &Health,
    leader: Option<u64>,
    term: u64,
) -> RegistryView {
    RegistryView {
        leader,
        term,
        applied_index,
        epoch: state.placement_epoch(),
        admin_key_hash: state.admin_key_hash().map(str::to_string),
        tenants: Vec::new(),
        nodes: state
            .nodes()
            .map(|n| {
                let (health, heartbeat) = health.verdict(n.id);
                NodeView { id: n.id, addr: n.addr.clone(), state: n.state, health, heartbeat }
            })
            .collect(),
    }
}

/// One tenant as gateways see it.
pub fn tenant_view(state: &RegistryState, t: &TenantRecord) -> TenantView {
    TenantView {
        id: t.id.clone(),
        key_hashes: t.key_hashes.clone(),
        enabled: t.enabled && !t.archived,
        owner: state.primary_of(&t.id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft_registry::command::apply;

    fn state() -> RegistryState {
        let mut state = RegistryState::default();
        for (i, (id, tier)) in [
            ("a", Tier::Free),
            ("b", Tier::Pro),
            ("c", Tier::Free),
            ("d", Tier::Pro),
            ("e", Tier::Free),
        ]
        .into_iter()
        .enumerate()
        {
            let hash = proto::auth::key_hash(&format!("key-{i}"));
            apply(&mut state, Command::AddTenant(TenantRecord::new(id.into(), tier, hash, 1)))
                .expect("add");
        }
        apply(&mut state, Command::DisableTenant { id: "c".into() }).expect("disable");
        state
    }

    /// Every page of a listing, as (ids, next_after).
    fn walk(
        state: &RegistryState,
        limit: u64,
        tier: Option<Tier>,
        status: Option<&str>,
    ) -> Vec<(Vec<String>, Option<String>)> {
        let filter = PageFilter::new(limit, tier, status, None).expect("valid filter");
        let mut after: Option<String> = None;
        let mut pages = Vec::new();
        loop {
            let AdminAnswer::TenantsPage { tenants, next_after: next } =
                tenants_page(state, after.as_deref(), &filter)
            else {
                panic!("a page of tenants answers as one");
            };
            let ids = tenants.into_iter().map(|t| t.tenant_id).collect();
            pages.push((ids, next.clone()));
            match next {
                Some(n) => after = Some(n),
                None => return pages,
            }
        }
    }

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    // Goal: pages follow id order from the cursor, hold at most `limit`, name the next cursor
    // only when more tenants match, and filter by tier and status; bad limits and statuses are
    // refused.
    #[test]
    fn pages_walk_the_registry_in_order() {
        let s = state();
        assert_eq!(
            walk(&s, 2, None, None),
            vec![
                (ids(&["a", "b"]), Some("b".into())),
                (ids(&["c", "d"]), Some("d".into())),
                (ids(&["e"]), None),
            ]
        );
        assert_eq!(walk(&s, 5, None, None), vec![(ids(&["a", "b", "c", "d", "e"]), None)]);
        assert_eq!(
            walk(&s, 1, Some(Tier::Pro), None),
            vec![(ids(&["b"]), Some("b".into())), (ids(&["d"]), None)]
        );
        assert_eq!(walk(&s, 10, Some(Tier::Free), Some("active")), vec![(ids(&["a", "e"]), None)]);
        assert_eq!(walk(&s, 10, None, Some("disabled")), vec![(ids(&["c"]), None)]);
        assert!(PageFilter::new(0, None, None, None).is_err());
        assert!(PageFilter::new(TENANTS_PAGE_MAX + 1, None, None, None).is_err());
        assert!(PageFilter::new(10, None, Some("gone"), None).is_err());
    }
}
