//! The gateway's in-memory copy of the registry: keys (as hashes) to tenants, tenants to owners,
//! owners to addresses. Fed by long-polling the nodes; nothing of it is ever written to disk.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

pub use proto::auth::key_hash;
use proto::cluster::{NodeHealth, NodeState, RegistryView, TenantView};

/// A registry view with the lookups a request needs.
#[derive(Debug, Default)]
pub struct IndexedView {
    pub view: RegistryView,
    by_key_hash: HashMap<String, usize>,
    by_id: HashMap<String, usize>,
    node_addr: HashMap<u64, SocketAddr>,
    dead_nodes: Vec<u64>,
}

impl IndexedView {
    pub fn new(view: RegistryView) -> IndexedView {
        let mut by_key_hash = HashMap::new();
        let mut by_id = HashMap::new();
        for (i, t) in view.tenants.iter().enumerate() {
            by_id.insert(t.id.clone(), i);
            for h in &t.key_hashes {
                by_key_hash.insert(h.clone(), i);
            }
        }
        // A removed node is no longer asked anything: not polled, not scraped, not sent admin.
        let node_addr = view
            .nodes
            .iter()
            .filter(|n| n.state != NodeState::Removed)
            .filter_map(|n| Some((n.id, n.addr.parse().ok()?)))
            .collect();
        let dead_nodes =
            view.nodes.iter().filter(|n| n.health == NodeHealth::Dead).map(|n| n.id).collect();
        IndexedView { view, by_key_hash, by_id, node_addr, dead_nodes }
    }

    pub fn tenant_by_key_hash(&self, hash: &str) -> Option<&TenantView> {
        self.by_key_hash.get(hash).map(|&i| &self.view.tenants[i])
    }

    pub fn tenant(&self, id: &str) -> Option<&TenantView> {
        self.by_id.get(id).map(|&i| &self.view.tenants[i])
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

    /// Takes what is newer in `view` (from any node) into the current view:
    /// - the registry part (tenants, keys, nodes, epoch) when its applied index is at least the
    ///   current one's;
    /// - each node's health when its verdict is newer ([`NodeView::health_is_newer_than`]), so
    ///   a node whose gossip lags can never turn a dead node alive again;
    /// - the leader when its term is at least the current one's.
    pub fn replace(&self, view: RegistryView) {
        let mut slot = self.current.write().unwrap_or_else(|p| p.into_inner());
        let merged = merge(&slot.view, view);
        if merged != slot.view {
            *slot = Arc::new(IndexedView::new(merged));
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
    use proto::cluster::NodeView;

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
