//! The tenants of a gateway's view, packed so that a registry of 1,000,000 tenants fits a
//! gateway (docs/BENCHMARKS.md, "What a tenant costs a gateway").
//!
//! Two persistent B-trees (`imbl::OrdMap`): key hash → tenant id, and tenant id → record (its
//! key hashes, enabled, owner). Entries live in the trees' nodes, with nothing allocated per
//! tenant: an id of up to [`ID_INLINE_BYTES_MAX`] bytes is held inline, a key hash as its 32
//! bytes, the owner as an index into a small table of node ids. B-tree nodes are at least half
//! full, where a hash trie's nodes have room for 32 entries each however few they hold (the maps
//! were `imbl::HashMap`s: 591 B of resident memory per tenant). The id tree is ordered by a hash
//! of the id, so ids that come in order (`acme-0001`, `acme-0002`, ...) fill its nodes as random
//! ones do rather than leaving each split node half empty. Cloning both trees is O(1) and a
//! change path-copies O(log tenants) nodes, so a view is published per registry change cheaply.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use imbl::OrdMap;
use proto::cluster::TenantView;

/// A key hash as bytes: half the size of its hex form.
pub(super) type KeyHash = [u8; 32];

pub(super) fn key_bytes(hash: &str) -> Option<KeyHash> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hash, &mut out).ok()?;
    Some(out)
}

/// The longest tenant id held inline (24 bytes in all with its length and tag); a longer one
/// (ids may have up to 63 bytes) is shared from the heap. Most ids are shorter.
const ID_INLINE_BYTES_MAX: usize = 22;

/// Distinct owners the table of node ids holds before it is rebuilt from the owners still named
/// (node ids are never reused, so the table grows only as nodes come and go: it never fills in
/// practice, but a gateway that ran for ever must not grow for ever).
const OWNERS_MAX: usize = 4_096;

/// The owner index of a tenant no node owns (no active node).
const NO_OWNER: u32 = u32::MAX;

/// A tenant id, inline when short.
#[derive(Clone)]
enum TenantId {
    Inline { len: u8, bytes: [u8; ID_INLINE_BYTES_MAX] },
    Shared(Arc<str>),
}

impl TenantId {
    fn new(id: &str) -> TenantId {
        match u8::try_from(id.len()) {
            Ok(len) if id.len() <= ID_INLINE_BYTES_MAX => {
                let mut bytes = [0u8; ID_INLINE_BYTES_MAX];
                bytes[..id.len()].copy_from_slice(id.as_bytes());
                TenantId::Inline { len, bytes }
            }
            _ => TenantId::Shared(Arc::from(id)),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            TenantId::Inline { len, bytes } => std::str::from_utf8(&bytes[..usize::from(*len)])
                .expect("an inline id holds all the bytes of a str"),
            TenantId::Shared(s) => s,
        }
    }
}

impl std::fmt::Debug for TenantId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

/// The id tree's key: a hash of the id first (see the module's note), then the id itself, so
/// two ids whose hashes collide are still two keys.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct IdKey {
    hash: u64,
    id: IdBytes,
}

/// A [`TenantId`] compared by its bytes.
#[derive(Clone, Debug)]
struct IdBytes(TenantId);

impl IdBytes {
    fn bytes(&self) -> &[u8] {
        match &self.0 {
            TenantId::Inline { len, bytes } => &bytes[..usize::from(*len)],
            TenantId::Shared(s) => s.as_bytes(),
        }
    }
}

impl PartialEq for IdBytes {
    fn eq(&self, other: &Self) -> bool {
        self.bytes() == other.bytes()
    }
}
impl Eq for IdBytes {}
impl PartialOrd for IdBytes {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for IdBytes {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.bytes().cmp(other.bytes())
    }
}

impl IdKey {
    fn new(id: &str) -> IdKey {
        IdKey::of(TenantId::new(id))
    }

    fn of(id: TenantId) -> IdKey {
        // SipHash with fixed keys: the same order in every process and every simulated run.
        let mut h = std::hash::DefaultHasher::new();
        id.as_str().hash(&mut h);
        IdKey { hash: h.finish(), id: IdBytes(id) }
    }
}

/// A tenant's key hashes: almost always one (two while a rotated key is in its grace period).
#[derive(Clone, Debug)]
enum Keys {
    One(KeyHash),
    Other(Arc<[KeyHash]>),
}

impl Keys {
    fn as_slice(&self) -> &[KeyHash] {
        match self {
            Keys::One(k) => std::slice::from_ref(k),
            Keys::Other(ks) => ks,
        }
    }
}

/// What the view holds of one tenant besides its id.
#[derive(Clone, Debug)]
struct Record {
    keys: Keys,
    /// Index into [`Tenants::owners`], or [`NO_OWNER`].
    owner: u32,
    enabled: bool,
}

/// What a request needs to know of one tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantEntry<'a> {
    pub id: &'a str,
    pub enabled: bool,
    /// The owning node in the view's epoch; `None` when no node is active.
    pub owner: Option<u64>,
}

/// Every tenant, by key hash and by id; cheap to clone (persistent maps).
#[derive(Debug, Default, Clone)]
pub(super) struct Tenants {
    by_key_hash: OrdMap<KeyHash, TenantId>,
    by_id: OrdMap<IdKey, Record>,
    /// The owners' node ids, indexed by [`Record::owner`]; shared until a new owner comes.
    owners: Arc<Vec<u64>>,
}

impl Tenants {
    pub(super) fn len(&self) -> usize {
        self.by_id.len()
    }

    pub(super) fn by_key_hash(&self, hash: &KeyHash) -> Option<TenantEntry<'_>> {
        let id = self.by_key_hash.get(hash)?;
        // A clone of the id copies it inline or counts a reference: nothing is allocated.
        let record = self.by_id.get(&IdKey::of(id.clone()))?;
        Some(self.entry(id, record))
    }

    pub(super) fn by_id(&self, id: &str) -> Option<TenantEntry<'_>> {
        let (key, record) = self.by_id.get_key_value(&IdKey::new(id))?;
        Some(self.entry(&key.id.0, record))
    }

    fn entry<'a>(&'a self, id: &'a TenantId, record: &Record) -> TenantEntry<'a> {
        let owner = self.owners.get(record.owner as usize).copied();
        TenantEntry { id: id.as_str(), enabled: record.enabled, owner }
    }

    pub(super) fn remove(&mut self, id: &str) {
        let key = IdKey::new(id);
        if let Some(old) = self.by_id.remove(&key) {
            for h in old.keys.as_slice() {
                // A key hash is never handed to two tenants at one index, but a change may
                // arrive before the removal of its old holder: drop only our own.
                if self.by_key_hash.get(h).is_some_and(|t| t.as_str() == id) {
                    self.by_key_hash.remove(h);
                }
            }
        }
    }

    pub(super) fn put(&mut self, t: TenantView) {
        self.remove(&t.id);
        // A registry key hash is always 64 hex digits; one that is not could never match.
        let hashes: Vec<KeyHash> = t.key_hashes.iter().filter_map(|h| key_bytes(h)).collect();
        let keys = match hashes.as_slice() {
            [one] => Keys::One(*one),
            _ => Keys::Other(hashes.into()),
        };
        let key = IdKey::new(&t.id);
        for h in keys.as_slice() {
            self.by_key_hash.insert(*h, key.id.0.clone());
        }
        let owner = self.owner_index(t.owner);
        self.by_id.insert(key, Record { keys, owner, enabled: t.enabled });
    }

    fn owner_index(&mut self, owner: Option<u64>) -> u32 {
        let Some(owner) = owner else { return NO_OWNER };
        if let Some(i) = self.owners.iter().position(|o| *o == owner) {
            return i as u32;
        }
        if self.owners.len() >= OWNERS_MAX {
            self.compact_owners();
        }
        let owners = Arc::make_mut(&mut self.owners);
        owners.push(owner);
        (owners.len() - 1) as u32
    }

    /// Rebuilds the owner table from the owners records still name: O(tenants), and only after
    /// [`OWNERS_MAX`] distinct owners.
    fn compact_owners(&mut self) {
        let old = self.owners.clone();
        let mut owners = Vec::new();
        let mut by_id = self.by_id.clone();
        for (key, record) in self.by_id.iter() {
            let Some(&node) = old.get(record.owner as usize) else { continue };
            let index = match owners.iter().position(|o| *o == node) {
                Some(i) => i,
                None => {
                    owners.push(node);
                    owners.len() - 1
                }
            };
            let record = Record { owner: index as u32, ..record.clone() };
            by_id.insert(key.clone(), record);
        }
        self.by_id = by_id;
        self.owners = Arc::new(owners);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(id: &str, keys: &[&str], owner: Option<u64>) -> TenantView {
        let key_hashes = keys.iter().map(|k| proto::auth::key_hash(k)).collect();
        TenantView { id: id.into(), key_hashes, enabled: true, owner }
    }

    fn by_key(t: &Tenants, key: &str) -> Option<String> {
        let hash = key_bytes(&proto::auth::key_hash(key))?;
        t.by_key_hash(&hash).map(|e| e.id.to_string())
    }

    // Goal: ids short and long (inline and shared), no key, one key and two keys, with and
    // without an owner, all read back exactly; a replaced tenant's old keys go.
    #[test]
    fn records_read_back_as_put() {
        let long = format!("t{}", "x".repeat(62));
        let mut t = Tenants::default();
        t.put(tenant("a", &["ka"], Some(7)));
        t.put(tenant(&long, &["kl1", "kl2"], None));
        t.put(tenant("b-22-bytes-exactly-xxx", &[], Some(9)));
        assert_eq!(t.len(), 3);
        assert_eq!(t.by_id("a"), Some(TenantEntry { id: "a", enabled: true, owner: Some(7) }));
        let l = t.by_id(&long);
        assert_eq!(l, Some(TenantEntry { id: &long, enabled: true, owner: None }));
        assert_eq!(by_key(&t, "kl2").as_deref(), Some(long.as_str()));
        assert_eq!(by_key(&t, "kl1").as_deref(), Some(long.as_str()));
        assert_eq!(t.by_id("b-22-bytes-exactly-xxx").and_then(|e| e.owner), Some(9));
        t.put(tenant(&long, &["kl3"], Some(7)));
        assert_eq!((by_key(&t, "kl1"), by_key(&t, "kl2")), (None, None));
        assert_eq!(by_key(&t, "kl3").as_deref(), Some(long.as_str()));
        assert_eq!(t.by_id(&long).and_then(|e| e.owner), Some(7));
        assert_eq!(t.owners.as_slice(), &[7, 9], "owners are shared, each named once");
        t.remove("a");
        assert_eq!((t.len(), by_key(&t, "ka"), t.by_id("a")), (2, None, None));
    }

    // Goal: past OWNERS_MAX distinct owners the table is rebuilt from the owners still named,
    // and every tenant keeps its owner.
    #[test]
    fn the_owner_table_stays_bounded() {
        let mut t = Tenants::default();
        t.put(tenant("kept", &["k"], Some(1)));
        for n in 0..OWNERS_MAX as u64 + 10 {
            // Each tenant moves to a new node: the old owners are no longer named.
            t.put(tenant("moving", &["m"], Some(1_000 + n)));
        }
        assert!(t.owners.len() < OWNERS_MAX, "the table was rebuilt: {}", t.owners.len());
        assert_eq!(t.by_id("kept").and_then(|e| e.owner), Some(1));
        assert_eq!(t.by_id("moving").and_then(|e| e.owner), Some(1_000 + OWNERS_MAX as u64 + 9));
    }
}
