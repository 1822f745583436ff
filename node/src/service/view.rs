//! The registry's view for gateways: whole, as a delta since an index, or a page at a time, and
//! the long-poll that waits for it to move.

use std::sync::Arc;
use std::time::Duration;

use proto::cluster::{
    NodeResponse, RegistryDelta, RegistryView, ViewUpdate, VIEW_TENANTS_PER_PART,
};
use raft_registry::Since;

use super::Service;

/// The longest a gateway's view long-poll is held open, whatever it asks for.
const VIEW_WAIT_MAX: Duration = Duration::from_secs(30);

impl Service {
    /// Long-poll: true as soon as the registry has applied past `known_index`, or as soon as
    /// gossip changed a node's health since `poller` was last sent a view (health is no Raft
    /// entry, so it does not move the index); false when `wait_ms` passed without either.
    pub(super) async fn view_wait(
        &self,
        poller: std::net::SocketAddr,
        known_index: u64,
        wait_ms: u64,
    ) -> bool {
        let mut rx = self.registry.subscribe();
        let mut health = self.health.generations();
        let wait = Duration::from_millis(wait_ms).min(VIEW_WAIT_MAX);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let applied = rx.borrow_and_update().0;
            let generation = *health.borrow_and_update();
            if applied > known_index
                || known_index == 0
                || self.view_peers.behind(poller, generation)
            {
                self.view_peers.sent(poller, generation);
                return true;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return false,
                () = self.stopping.cancelled() => return false,
                changed = rx.changed() => if changed.is_err() { return false },
                changed = health.changed() => if changed.is_err() { return false },
            }
        }
    }

    /// What a gateway holding the registry at `known_index` takes to be current: only the
    /// tenants changed since, or the whole view on first contact (`known_index` 0), after a
    /// placement change, or when this node's change log does not reach back to `known_index`.
    /// A node behind `known_index` answers its head alone (nodes, health, leader), which the
    /// gateway merges as an older view.
    pub fn view_update(&self, known_index: u64) -> ViewUpdate {
        if known_index == 0 {
            return self.whole_view();
        }
        let (applied, state) = self.registry.subscribe().borrow().clone();
        let status = self.registry.status();
        let head =
            crate::admin::registry_head(applied, &state, &self.health, status.leader, status.term);
        let mut delta = RegistryDelta { since: known_index, head, ..Default::default() };
        if applied <= known_index {
            return ViewUpdate::Delta(delta);
        }
        let Since::Tenants(ids) = self.registry.changes_since(known_index, applied) else {
            return self.whole_view();
        };
        for id in ids {
            match state.tenant(&id) {
                Some(t) => delta.changed.push(crate::admin::tenant_view(&state, t)),
                None => delta.removed.push(id),
            }
        }
        ViewUpdate::Delta(delta)
    }

    /// The whole registry for a gateway: in one message up to
    /// [`VIEW_TENANTS_PER_PART`] tenants, else its first part ([`ViewUpdate::FullFirst`]; the
    /// gateway asks for the rest by [`Service::view_page`]).
    fn whole_view(&self) -> ViewUpdate {
        let (applied, state) = self.registry.subscribe().borrow().clone();
        if state.tenant_count() as u64 <= VIEW_TENANTS_PER_PART {
            return ViewUpdate::Full(self.build_view());
        }
        let status = self.registry.status();
        let mut first =
            crate::admin::registry_head(applied, &state, &self.health, status.leader, status.term);
        first.tenants = state
            .tenants()
            .take(VIEW_TENANTS_PER_PART as usize)
            .map(|t| crate::admin::tenant_view(&state, t))
            .collect();
        ViewUpdate::FullFirst(first)
    }

    /// Up to `limit` tenants after `after`, in id order, as the registry is now
    /// ([`NodeRequest::ViewPage`]).
    pub(super) fn view_page(&self, after: &str, limit: u64) -> NodeResponse {
        let state = self.registry.state();
        let limit = limit.clamp(1, VIEW_TENANTS_PER_PART) as usize;
        let mut rest = state.tenants_after(Some(after));
        let tenants =
            rest.by_ref().take(limit).map(|t| crate::admin::tenant_view(&state, t)).collect();
        NodeResponse::ViewPage { tenants, more: rest.next().is_some() }
    }

    /// The registry as gateways see it, rebuilt only when the applied index moved.
    pub fn build_view(&self) -> RegistryView {
        let (applied, state) = self.registry.subscribe().borrow().clone();
        let status = self.registry.status();
        let mut cache = self.view_cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = cache.as_ref().filter(|v| {
            v.applied_index == applied
                && (v.leader, v.term) == (status.leader, status.term)
                && !self.health.changed_since_view()
        }) {
            return (**v).clone();
        }
        let view =
            crate::admin::registry_view(applied, &state, &self.health, status.leader, status.term);
        *cache = Some(Arc::new(view.clone()));
        view
    }
}
