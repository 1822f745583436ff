//! The gateway's in-memory copy of the registry: keys (as hashes) to tenants, tenants to owners,
//! owners to addresses. Fed by long-polling the nodes; nothing of it is ever written to disk.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

pub use proto::auth::key_hash;
use proto::cluster::{NodeHealth, RegistryView, TenantView};

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
        let node_addr =
            view.nodes.iter().filter_map(|n| Some((n.id, n.addr.parse().ok()?))).collect();
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

    /// Every node address the view knows, for polling and fan-out.
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
#[derive(Clone, Default)]
pub struct ViewHandle(Arc<RwLock<Arc<IndexedView>>>);

impl ViewHandle {
    pub fn current(&self) -> Arc<IndexedView> {
        // A poisoned lock only means a writer panicked mid-swap of an Arc; the Arc is intact.
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn replace(&self, view: RegistryView) {
        let indexed = Arc::new(IndexedView::new(view));
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = indexed;
    }
}
