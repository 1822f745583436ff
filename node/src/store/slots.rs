//! The store's slots: one per tenant the store has seen since it opened, kept in large chunks.
//!
//! An idle copy of a tenant costs its node its slot and nothing else (docs/BENCHMARKS.md, "Idle
//! tenants with three copies"), so the slots are laid out for that:
//! - A slot, its tenant id and its index entry sit in a few large allocations shared by
//!   about a thousand slots each ([`SLOTS_PER_CHUNK`]), not in small allocations of their own.
//!   Small ones would be made at each tenant's first load, among that load's own allocations of
//!   the same sizes, and would keep the allocator's pages of those sizes partly used after the
//!   load's were freed: resident memory well above what the slots hold.
//! - An id of up to [`TenantKey::INLINE_MAX`] bytes (most ids) is held in place, a longer one
//!   boxed.
//! - Slots are never removed: a tenant that leaves the node has its slot emptied
//!   (`Store::forget`). So a slot's place never changes hands, and a [`SlotRef`] held
//!   outside the lock always means the tenant it was looked up for. The slots of tenants gone
//!   from the node are bounded by the tenants the cluster registered, and go at the next start.
//! - Iteration is in the order slots were made, which the simulator's replay of a seed repeats.

use std::hash::BuildHasher;
use std::sync::Arc;

use super::Slot;

/// Slots per chunk: as many as fit, with the `Arc`'s two counts, in 24 KiB (one of the
/// allocator's large size classes, so a chunk wastes nothing to rounding). Ids are chunked
/// the same.
pub(super) const SLOTS_PER_CHUNK: usize =
    (24 * 1024 - 2 * std::mem::size_of::<usize>()) / std::mem::size_of::<Slot>();

const _: () = assert!(SLOTS_PER_CHUNK * std::mem::size_of::<TenantKey>() <= 24 * 1024);

/// A tenant id, in place when it is short: a slot's id, which then costs no small allocation of
/// its own.
#[derive(Clone)]
pub enum TenantKey {
    Inline { len: u8, bytes: [u8; TenantKey::INLINE_MAX] },
    Boxed(Box<str>),
}

// The size docs/BENCHMARKS.md counts on: one pointer-sized word more than a `Box<str>`.
const _: () = assert!(std::mem::size_of::<TenantKey>() == 24);

impl TenantKey {
    /// The longest id held in place.
    pub const INLINE_MAX: usize = 22;

    pub fn new(id: &str) -> TenantKey {
        match u8::try_from(id.len()) {
            Ok(len) if id.len() <= Self::INLINE_MAX => {
                let mut bytes = [0; Self::INLINE_MAX];
                bytes[..id.len()].copy_from_slice(id.as_bytes());
                TenantKey::Inline { len, bytes }
            }
            _ => TenantKey::Boxed(id.into()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            TenantKey::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).expect("made from a str")
            }
            TenantKey::Boxed(id) => id,
        }
    }
}

/// The slots, their ids, and an index from id to slot number.
pub(super) struct Slots {
    /// Slot numbers, found by the hash of their ids.
    index: hashbrown::HashTable<u32>,
    hasher: std::hash::RandomState,
    chunks: Vec<Chunk>,
    len: usize,
}

struct Chunk {
    slots: Arc<[Slot]>,
    /// The ids of the slots in use, in slot order; made with room for the whole chunk, so it
    /// never moves.
    ids: Vec<TenantKey>,
}

/// One slot, held apart from the lock over all of them: it keeps its chunk alive.
#[derive(Clone)]
pub(super) struct SlotRef {
    chunk: Arc<[Slot]>,
    at: usize,
}

impl std::ops::Deref for SlotRef {
    type Target = Slot;

    fn deref(&self) -> &Slot {
        &self.chunk[self.at]
    }
}

impl Default for Slots {
    fn default() -> Slots {
        Slots {
            index: hashbrown::HashTable::new(),
            hasher: std::hash::RandomState::new(),
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl Slots {
    fn number_of(&self, id: &str) -> Option<usize> {
        let hash = self.hasher.hash_one(id);
        let n = *self.index.find(hash, |&n| self.id_at(n as usize) == id)?;
        Some(n as usize)
    }

    /// The id of slot number `n` (from [`Self::iter`]).
    pub fn id_at(&self, n: usize) -> &str {
        self.chunks[n / SLOTS_PER_CHUNK].ids[n % SLOTS_PER_CHUNK].as_str()
    }

    fn slot_at(&self, n: usize) -> &Slot {
        &self.chunks[n / SLOTS_PER_CHUNK].slots[n % SLOTS_PER_CHUNK]
    }

    /// Slot number `n` (from [`Self::iter`]), to hold apart from the lock.
    pub fn ref_at(&self, n: usize) -> SlotRef {
        SlotRef { chunk: self.chunks[n / SLOTS_PER_CHUNK].slots.clone(), at: n % SLOTS_PER_CHUNK }
    }

    /// The tenant's slot, if the store has made one.
    pub fn get(&self, id: &str) -> Option<SlotRef> {
        self.number_of(id).map(|n| self.ref_at(n))
    }

    /// The tenant's slot number, if the store has made its slot.
    pub fn number(&self, id: &str) -> Option<u32> {
        self.number_of(id).map(|n| n as u32)
    }

    /// The tenant's slot, made (empty) if it has none.
    pub fn get_or_make(&mut self, id: &str) -> SlotRef {
        let n = self.number_or_make(id);
        self.ref_at(n as usize)
    }

    /// The tenant's slot number, its slot made (empty) if it has none.
    pub fn number_or_make(&mut self, id: &str) -> u32 {
        if let Some(n) = self.number_of(id) {
            return n as u32;
        }
        let n = self.len;
        let number = u32::try_from(n).expect("fewer than 2^32 tenants on a node");
        if n.is_multiple_of(SLOTS_PER_CHUNK) {
            self.chunks.push(Chunk {
                slots: (0..SLOTS_PER_CHUNK).map(|_| Slot::default()).collect(),
                ids: Vec::with_capacity(SLOTS_PER_CHUNK),
            });
        }
        self.chunks[n / SLOTS_PER_CHUNK].ids.push(TenantKey::new(id));
        self.len += 1;
        let Slots { index, hasher, chunks, .. } = self;
        let id_of = |n: &u32| {
            let n = *n as usize;
            chunks[n / SLOTS_PER_CHUNK].ids[n % SLOTS_PER_CHUNK].as_str()
        };
        index.insert_unique(hasher.hash_one(id), number, |n| hasher.hash_one(id_of(n)));
        number
    }

    /// Every slot with its number and id, in the order they were made.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &str, &Slot)> {
        (0..self.len).map(|n| (n, self.id_at(n), self.slot_at(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hold_every_valid_id() {
        // Goal: an id reads back as given, in place up to INLINE_MAX bytes and boxed past it,
        // up to the longest valid id.
        for len in 1..=proto::auth::TENANT_ID_BYTES_MAX {
            let id: String = (0..len).map(|i| (b'a' + (i % 26) as u8) as char).collect();
            let key = TenantKey::new(&id);
            assert_eq!(key.as_str(), id);
            assert_eq!(matches!(key, TenantKey::Inline { .. }), len <= TenantKey::INLINE_MAX);
        }
    }

    #[test]
    fn slots_are_found_by_id_across_chunks() {
        // Goal: each id finds its own slot, made once, past a chunk's end; iteration follows
        // the order of making.
        let mut slots = Slots::default();
        let ids: Vec<String> = (0..SLOTS_PER_CHUNK * 2 + 3).map(|i| format!("t{i}")).collect();
        for (i, id) in ids.iter().enumerate() {
            assert!(slots.get(id).is_none());
            let made = slots.get_or_make(id);
            lock(&made).storage_bytes = super::super::KnownBytes::of(i as u64);
        }
        assert_eq!(slots.chunks.len(), 3);
        for (i, id) in ids.iter().enumerate() {
            let again = slots.get_or_make(id);
            assert_eq!(lock(&again).storage_bytes.get(), Some(i as u64), "{id}");
            assert_eq!(lock(&slots.get(id).unwrap()).storage_bytes.get(), Some(i as u64));
        }
        assert_eq!(slots.len, ids.len());
        let listed: Vec<&str> = slots.iter().map(|(_, id, _)| id).collect();
        assert_eq!(listed, ids.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(slots.get("absent").is_none());
    }

    fn lock(slot: &Slot) -> std::sync::MutexGuard<'_, super::super::SlotState> {
        slot.state.lock().unwrap()
    }
}
