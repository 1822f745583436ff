//! The gateway's in-memory copy of the registry: keys (as hashes) to tenants, tenants to owners,
//! owners to addresses. Fed by long-polling the nodes; nothing of it is ever written to disk.
//!
//! It follows the registry by changes ([`ViewUpdate`]): a node sends the whole registry once,
//! then only the tenants changed since the applied index the gateway holds. Tenants live in
//! persistent maps, so taking a change costs O(log tenants) and publishing the new view O(1),
//! however many tenants there are. Each tenant is packed into the maps' nodes ([`tenants`]);
//! `cargo run --release -p gateway --example view_memory` measures what a tenant costs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

pub use proto::auth::key_hash;
use proto::cluster::{NodeHealth, NodeState, RegistryDelta, RegistryView, ViewUpdate};

mod tenants;

pub use tenants::TenantEntry;
use tenants::{key_bytes, Tenants};

/// A registry view with the lookups a request needs.
#[derive(Debug, Default)]
pub struct IndexedView {
    /// Everything but the tenants (`view.tenants` is always empty: they are in the maps).
    pub view: RegistryView,
    tenants: Tenants,
    node_addr: HashMap<u64, SocketAddr>,
    dead_nodes: Vec<u64>,
}

impl IndexedView {
    pub fn new(mut view: RegistryView) -> IndexedView {
        let mut tenants = Tenants::default();
        for t in std::mem::take(&mut view.tenants) {
            tenants.put(t);
        }
        IndexedView::with_tenants(view, tenants)
    }

    /// `head` (a view without tenants) with these tenants.
    fn with_tenants(head: RegistryView, tenants: Tenants) -> IndexedView {
        debug_assert!(head.tenants.is_empty(), "tenants live in the maps");
        // A removed node is no longer asked anything: not polled, not scraped, not sent admin.
        let node_addr = head
            .nodes
            .iter()
            .filter(|n| n.state != NodeState::Removed)
            .filter_map(|n| Some((n.id, n.addr.parse().ok()?)))
            .collect();
        let dead_nodes =
            head.nodes.iter().filter(|n| n.health == NodeHealth::Dead).map(|n| n.id).collect();
        IndexedView { view: head, tenants, node_addr, dead_nodes }
    }

    pub fn tenant_by_key_hash(&self, hash: &str) -> Option<TenantEntry<'_>> {
        self.tenants.by_key_hash(&key_bytes(hash)?)
    }

    pub fn tenant(&self, id: &str) -> Option<TenantEntry<'_>> {
        self.tenants.by_id(id)
    }

    /// How many tenants the view holds.
    pub fn tenant_count(&self) -> usize {
        self.tenants.len()
    }
    pub fn node_addr(&self, id: u64) -> Option<SocketAddr> {
        self.node_addr.get(&id).copied()
    }

    /// True when gossip says the node is dead: its tenants are answered 503 at once.
    pub fn is_dead(&self, id: u64) -> bool {
        self.dead_nodes.contains(&id)
    }

    /// The addresses of removed nodes: a seed at one of them is no longer asked anything.
    pub fn removed_addrs(&self) -> Vec<SocketAddr> {
        let removed = self.view.nodes.iter().filter(|n| n.state == NodeState::Removed);
        removed.filter_map(|n| n.addr.parse().ok()).collect()
    }

    /// The Raft leader's address, when the view names one that is not dead.
    pub fn leader_addr(&self) -> Option<SocketAddr> {
        self.view.leader.filter(|l| !self.is_dead(*l)).and_then(|l| self.node_addr(l))
    }

    /// The address of every node not removed, for polling and fan-out.
    pub fn node_addrs(&self) -> Vec<(u64, SocketAddr)> {
        let mut v: Vec<_> = self.node_addr.iter().map(|(i, a)| (*i, *a)).collect();
        v.sort();
        v
    }

    pub fn is_admin(&self, hash: &str) -> bool {
        self.view.admin_key_hash.as_deref() == Some(hash)
    }
}

/// The shared, swappable current view.
#[derive(Clone)]
pub struct ViewHandle {
    current: Arc<RwLock<Arc<IndexedView>>>,
    /// Grows by one at every change, so waiters (an admin write looking for a new leader) wake.
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for ViewHandle {
    fn default() -> Self {
        ViewHandle {
            current: Arc::default(),
            changes: Arc::new(tokio::sync::watch::Sender::new(0)),
        }
    }
}

impl ViewHandle {
    pub fn current(&self) -> Arc<IndexedView> {
        // A poisoned lock only means a writer panicked mid-swap of an Arc; the Arc is intact.
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Watches the count of changes.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Takes what is newer in `view` (the whole registry, from any node) into the current view.
    pub fn replace(&self, view: RegistryView) {
        self.update(ViewUpdate::Full(view));
    }

    /// Takes what is newer in `update` (from any node) into the current view:
    /// - the registry part (tenants, keys, nodes, epoch) when its applied index is at least the
    ///   current one's; a delta only when it starts at or before the current index, so that
    ///   together with what the view holds it makes the registry at its own index;
    /// - each node's health with the registry part;
    /// - the leader when its term is at least the current one's.
    pub fn update(&self, update: ViewUpdate) {
        let mut slot = self.current.write().unwrap_or_else(|p| p.into_inner());
        let current_index = slot.view.applied_index;
        let (mut head, tenants) = match update {
            ViewUpdate::Full(mut view) => {
                let tenants = std::mem::take(&mut view.tenants);
                let newer = view.applied_index > current_index
                    || (view.applied_index == current_index && slot.tenant_count() == 0);
                let tenants = newer.then(|| {
                    let mut all = Tenants::default();
                    tenants.into_iter().for_each(|t| all.put(t));
                    all
                });
                (view, tenants)
            }
            ViewUpdate::FullFirst(view) => {
                // `forward::whole` makes it whole first; a part alone is not the registry.
                tracing::warn!(index = view.applied_index, "part of a registry taken as a whole");
                return;
            }
            ViewUpdate::Delta(RegistryDelta { since, head, changed, removed }) => {
                if since > current_index {
                    // Never sent: the index asked with is one this view held. Taking it would
                    // skip the changes in between.
                    tracing::warn!(since, current_index, "a registry delta from past this view");
                    return;
                }
                let newer = head.applied_index > current_index;
                let tenants = newer.then(|| {
                    let mut next = slot.tenants.clone();
                    removed.iter().for_each(|id| next.remove(id));
                    changed.into_iter().for_each(|t| next.put(t));
                    next
                });
                (head, tenants)
            }
        };
        head.tenants.clear();
        let merged = merge(&slot.view, head);
        if merged != slot.view || tenants.is_some() {
            let tenants = tenants.unwrap_or_else(|| slot.tenants.clone());
            *slot = Arc::new(IndexedView::with_tenants(merged, tenants));
            drop(slot);
            self.changes.send_modify(|n| *n += 1);
        }
    }
}

fn merge(current: &RegistryView, new: RegistryView) -> RegistryView {
    let fresher = new.applied_index >= current.applied_index;
    let (leader, term) = if new.term >= current.term && new.leader.is_some() {
        (new.leader, new.term)
    } else {
        (current.leader, current.term)
    };
    let (mut merged, other) = if fresher { (new, current.clone()) } else { (current.clone(), new) };
    // Health follows the fresher view, as the registry part does: a verdict kept by its version
    // alone could stay "dead" after the node came back (see ARCHITECTURE.md, gateway health).
    drop(other);
    merged.leader = leader;
    merged.term = term;
    merged
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::cluster::{NodeView, TenantView};

    fn tenant(id: &str, key: &str, enabled: bool) -> TenantView {
        TenantView { id: id.into(), key_hashes: vec![key_hash(key)], enabled, owner: Some(1) }
    }

    fn delta(since: u64, index: u64, changed: Vec<TenantView>, removed: &[&str]) -> ViewUpdate {
        let head = RegistryView { applied_index: index, ..Default::default() };
        let removed = removed.iter().map(|r| r.to_string()).collect();
        ViewUpdate::Delta(RegistryDelta { since, head, changed, removed })
    }

    fn owner_of_key(views: &ViewHandle, key: &str) -> Option<String> {
        views.current().tenant_by_key_hash(&key_hash(key)).map(|t| t.id.to_string())
    }

    // Goal: a delta changes exactly the tenants it names (a rotated key stops working, a
    // removed tenant goes, a new one comes) and keeps the rest; a delta older than the view, or
    // one starting past it, changes no tenant.
    #[test]
    fn deltas_change_only_what_they_name() {
        let views = ViewHandle::default();
        let full = RegistryView {
            applied_index: 5,
            tenants: vec![tenant("a", "ka", true), tenant("b", "kb", true)],
            ..Default::default()
        };
        views.update(ViewUpdate::Full(full));
        assert_eq!(owner_of_key(&views, "ka").as_deref(), Some("a"));
        let changes = views.subscribe();
        views.update(delta(5, 7, vec![tenant("a", "ka2", false), tenant("c", "kc", true)], &["b"]));
        assert!(changes.has_changed().unwrap_or(false), "waiters are woken");
        let v = views.current();
        assert_eq!(v.view.applied_index, 7);
        assert_eq!(owner_of_key(&views, "ka"), None, "the old key stops working");
        assert_eq!(owner_of_key(&views, "ka2").as_deref(), Some("a"));
        assert_eq!(v.tenant("a").map(|t| t.enabled), Some(false));
        assert!(v.tenant("b").is_none() && owner_of_key(&views, "kb").is_none());
        assert_eq!(owner_of_key(&views, "kc").as_deref(), Some("c"));
        assert_eq!(v.tenant_count(), 2);

        views.update(delta(5, 6, vec![tenant("b", "kb", true)], &["c"]));
        views.update(delta(9, 10, vec![tenant("d", "kd", true)], &[]));
        let v = views.current();
        assert_eq!(v.view.applied_index, 7);
        assert!(v.tenant("b").is_none() && v.tenant("c").is_some() && v.tenant("d").is_none());

        // A delta from before the view's index but reaching past it carries every change since
        // its start: taking it again is harmless.
        views.update(delta(6, 8, vec![tenant("a", "ka2", false), tenant("e", "ke", true)], &[]));
        let v = views.current();
        assert_eq!((v.view.applied_index, v.tenant_count()), (8, 3));
        // A whole view at a higher index replaces every tenant.
        let full = RegistryView {
            applied_index: 9,
            tenants: vec![tenant("z", "kz", true)],
            ..Default::default()
        };
        views.update(ViewUpdate::Full(full));
        assert_eq!(views.current().tenant_count(), 1);
        assert_eq!(owner_of_key(&views, "ka2"), None);
    }

    fn view(index: u64, health: &[(u64, NodeHealth, u64)], leader: (u64, u64)) -> RegistryView {
        RegistryView {
            applied_index: index,
            nodes: health
                .iter()
                .map(|&(id, health, heartbeat)| NodeView {
                    id,
                    addr: format!("127.0.0.1:{}", 7000 + id),
                    state: NodeState::Active,
                    health,
                    heartbeat,
                })
                .collect(),
            leader: Some(leader.0),
            term: leader.1,
            ..Default::default()
        }
    }

    // Goal: the registry part and health follow the applied index; the leader follows the term.
    #[test]
    fn views_merge_by_index_and_term() {
        let views = ViewHandle::default();
        views.replace(view(10, &[(1, NodeHealth::Alive, 50), (2, NodeHealth::Dead, 40)], (1, 3)));
        assert!(views.current().is_dead(2));
        views.replace(view(9, &[(1, NodeHealth::Alive, 51), (2, NodeHealth::Alive, 41)], (2, 4)));
        assert!(views.current().is_dead(2), "an older index changes no health");
        assert_eq!((views.current().view.leader, views.current().view.term), (Some(2), 4));
        views.replace(view(11, &[(1, NodeHealth::Alive, 52), (2, NodeHealth::Alive, 42)], (1, 3)));
        assert!(!views.current().is_dead(2));
        assert_eq!(views.current().view.applied_index, 11);
        assert_eq!(views.current().view.leader, Some(2), "an older term never wins");
    }
}
