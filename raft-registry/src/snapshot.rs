//! The snapshot image: the bytes a snapshot file holds after its meta record, and the bytes a
//! leader sends a follower (openraft cuts them into `SNAPSHOT_CHUNK_BYTES` chunks, and the
//! follower installs them once reassembled).
//!
//! An image is a sequence of checksummed records ([`disk::frame`]), not one: a million tenants
//! encode to about 126 MB, twice what one record may hold ([`RECORD_PAYLOAD_BYTES_MAX`]), and
//! half a million already claim more than one bounded decode may. The header comes first and gives the count of
//! each list, so a reader knows where the image ends and refuses one claiming more than
//! [`TENANT_IDS_MAX`] before reading on:
//!
//! ```text
//! [header: version, counts, admin key hash, nodes, placement epoch]
//! [tenants: at most SNAPSHOT_CHUNK_ITEMS]   ... until the tenant count
//! [handoffs: at most SNAPSHOT_CHUNK_ITEMS]  ... until the handoff count
//! [purged ids: at most SNAPSHOT_CHUNK_ITEMS] ... until the purged count
//! ```
//!
//! Building encodes one chunk at a time straight from the state's maps, and reading inserts
//! each chunk into the state as it is decoded: either needs the image's bytes and the state,
//! plus one chunk, never a list of every tenant beside them.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::disk::{self, StoreError, RECORD_PAYLOAD_BYTES_MAX};
use crate::state::{
    Handoff, NodeRecord, NodeState, RegistryState, TenantRecord, ACTIVE_NODES_MAX,
    ADMIN_EMAIL_LEN_MAX, KEY_HASHES_PER_TENANT_MAX, REPLICAS_MAX, TENANT_IDS_MAX,
};

/// Version of the snapshot image (on disk and between nodes). Version 4 made the image a
/// sequence of records; versions 2 and 3 (one record) live only in directories of format 2,
/// which this build refuses (`crate::format`). Version 5 adds a last record, the cluster's
/// [`Settings`]; a version 4 image is still read, with the settings' defaults.
pub const SNAPSHOT_FORMAT_VERSION: u32 = 5;

/// The oldest image version this build reads.
const SNAPSHOT_FORMAT_OLDEST: u32 = 4;

/// Tenants (or handoffs, or purged ids) per record of an image (10,000): about 1.3 MB of
/// tenants as measured (126 B each), and at most [`TENANT_RECORD_BYTES_MAX`] × 10,000 = 10 MB, well inside
/// one record and small beside the state it is read into.
pub const SNAPSHOT_CHUNK_ITEMS: usize = 10_000;

/// Most bytes one tenant record encodes to: an id of 63, [`KEY_HASHES_PER_TENANT_MAX`] hashes of
/// 64 hex digits, an e-mail of [`ADMIN_EMAIL_LEN_MAX`], and their lengths and numbers.
const TENANT_RECORD_BYTES_MAX: usize =
    64 + KEY_HASHES_PER_TENANT_MAX * 65 + ADMIN_EMAIL_LEN_MAX + 64;

const _: () = assert!(SNAPSHOT_CHUNK_ITEMS * TENANT_RECORD_BYTES_MAX < RECORD_PAYLOAD_BYTES_MAX);

/// The first record of an image.
#[derive(Serialize, Deserialize)]
struct Header {
    format_version: u32,
    tenants: u64,
    handoffs: u64,
    purged: u64,
    admin_key_hash: Option<String>,
    nodes: Vec<NodeRecord>,
    placement_epoch: u64,
}

/// The last record of an image of version 5: cluster-wide settings.
#[derive(Serialize, Deserialize)]
struct Settings {
    replicas: u8,
    /// Every node ever marked down: (id, down now, epoch of the mark).
    liveness: Vec<(u64, bool, u64)>,
}

/// Encodes `state` as an image of [`SNAPSHOT_CHUNK_ITEMS`] per record.
pub(crate) fn encode_state(state: &RegistryState) -> Result<Vec<u8>, StoreError> {
    encode_state_chunked(state, SNAPSHOT_CHUNK_ITEMS)
}

/// Encodes `state` as an image of `chunk_items` (at least 1) list items per record.
pub(crate) fn encode_state_chunked(
    state: &RegistryState,
    chunk_items: usize,
) -> Result<Vec<u8>, StoreError> {
    assert!(chunk_items > 0, "a snapshot chunk holds at least one item");
    let ids = state.tenants.len() + state.purged.len();
    if ids > TENANT_IDS_MAX || state.handoffs.len() > TENANT_IDS_MAX {
        let reason = format!("{ids} tenant ids, more than {TENANT_IDS_MAX}");
        return Err(StoreError::Encode { what: "snapshot image", reason });
    }
    let header = Header {
        format_version: SNAPSHOT_FORMAT_VERSION,
        tenants: state.tenants.len() as u64,
        handoffs: state.handoffs.len() as u64,
        purged: state.purged.len() as u64,
        admin_key_hash: state.admin_key_hash.clone(),
        nodes: state.nodes.values().cloned().collect(),
        placement_epoch: state.placement_epoch,
    };
    let mut out = Vec::new();
    disk::append_frame(&mut out, &disk::encode("snapshot header", &header)?);
    append_chunks(&mut out, "snapshot tenants", state.tenants.values().map(|t| &**t), chunk_items)?;
    append_chunks(&mut out, "snapshot handoffs", state.handoffs.values(), chunk_items)?;
    append_chunks(&mut out, "snapshot purged ids", state.purged.iter(), chunk_items)?;
    let liveness = state.liveness.iter().map(|(id, l)| (*id, l.down, l.epoch)).collect();
    let settings = Settings { replicas: state.replicas, liveness };
    disk::append_frame(&mut out, &disk::encode("snapshot settings", &settings)?);
    Ok(out)
}

/// Appends `items` to `out` as records of at most `chunk_items` each. After the first record it
/// reserves room for the rest at the same size, so the image is not copied as it grows.
fn append_chunks<'a, T: Serialize + 'a>(
    out: &mut Vec<u8>,
    what: &'static str,
    items: impl ExactSizeIterator<Item = &'a T>,
    chunk_items: usize,
) -> Result<(), StoreError> {
    let total = items.len();
    let mut chunk: Vec<&T> = Vec::with_capacity(chunk_items.min(total));
    let mut first = true;
    let mut items = items.peekable();
    while items.peek().is_some() {
        chunk.clear();
        chunk.extend(items.by_ref().take(chunk_items));
        let payload = disk::encode(what, &chunk)?;
        disk::append_frame(out, &payload);
        if first {
            first = false;
            let chunks_left = (total - chunk.len()).div_ceil(chunk_items);
            out.reserve(chunks_left.saturating_mul(payload.len() + disk::RECORD_HEADER_BYTES));
        }
    }
    Ok(())
}

/// The records of an image, read one at a time.
struct Records<'a> {
    origin: &'a Path,
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Records<'a> {
    fn corrupt(&self, reason: String) -> StoreError {
        StoreError::Corrupt { path: self.origin.to_path_buf(), reason }
    }

    /// The payload of the next record, checksum checked.
    fn next(&mut self, what: &str) -> Result<&'a [u8], StoreError> {
        let bytes: &'a [u8] = self.bytes;
        let rest = bytes.get(self.at..).unwrap_or_default();
        let Some((payload, used)) = disk::parse_frame(rest) else {
            let reason = format!(
                "snapshot {what} record at byte {} is torn (cut short, too long or failing its \
                 checksum)",
                self.at
            );
            return Err(self.corrupt(reason));
        };
        self.at += used;
        Ok(payload)
    }

    /// Reads records of `T` until `count` items are read, giving each item to `each`. Every
    /// record holds at least one item and no more than are left.
    fn chunks<T: DeserializeOwned>(
        &mut self,
        what: &str,
        count: u64,
        mut each: impl FnMut(T),
    ) -> Result<(), StoreError> {
        let mut left = count;
        while left > 0 {
            let origin = self.origin;
            let chunk: Vec<T> = disk::decode(origin, self.next(what)?)?;
            if chunk.is_empty() || chunk.len() as u64 > left {
                let reason =
                    format!("snapshot {what} record of {} items, {left} left", chunk.len());
                return Err(self.corrupt(reason));
            }
            left -= chunk.len() as u64;
            chunk.into_iter().for_each(&mut each);
        }
        Ok(())
    }
}

/// Decodes an image made by [`encode_state`]; `origin` names it in errors (a file, or the
/// snapshot received from the leader). Holds at most one record's items beside the state.
pub(crate) fn decode_state(origin: &Path, data: &[u8]) -> Result<RegistryState, StoreError> {
    let mut records = Records { origin, bytes: data, at: 0 };
    let header = records.next("header")?;
    // Every version starts with its number (a varint), so it is read first.
    let (version, _) = proto::wire::decode_bounded::<u32, RECORD_PAYLOAD_BYTES_MAX>(header)
        .map_err(|e| records.corrupt(e.to_string()))?;
    if !(SNAPSHOT_FORMAT_OLDEST..=SNAPSHOT_FORMAT_VERSION).contains(&version) {
        let reason = format!(
            "snapshot format {version} (we read {SNAPSHOT_FORMAT_OLDEST} to \
             {SNAPSHOT_FORMAT_VERSION})"
        );
        return Err(records.corrupt(reason));
    }
    let header: Header = disk::decode(origin, header)?;
    let ids = header.tenants.saturating_add(header.purged);
    if ids > TENANT_IDS_MAX as u64 || header.handoffs > TENANT_IDS_MAX as u64 {
        let reason = format!(
            "{ids} tenant ids and {} handoffs, more than {TENANT_IDS_MAX}",
            header.handoffs
        );
        return Err(records.corrupt(reason));
    }
    let active = header.nodes.iter().filter(|n| n.state == NodeState::Active).count();
    if active > ACTIVE_NODES_MAX {
        let reason = format!("{active} active nodes, more than {ACTIVE_NODES_MAX}");
        return Err(records.corrupt(reason));
    }
    let mut state = RegistryState::from_parts(
        Vec::new(),
        header.admin_key_hash,
        header.nodes,
        header.placement_epoch,
        Vec::new(),
        Vec::new(),
    );
    records.chunks("tenants", header.tenants, |t: TenantRecord| state.load_tenant(t))?;
    records.chunks("handoffs", header.handoffs, |h: Handoff| state.load_handoff(h))?;
    records.chunks("purged ids", header.purged, |id: String| state.load_purged(id))?;
    if version >= 5 {
        let settings: Settings = disk::decode(origin, records.next("settings")?)?;
        if !(1..=REPLICAS_MAX).contains(&settings.replicas) {
            let reason = format!("replication factor {} (1 to {REPLICAS_MAX})", settings.replicas);
            return Err(records.corrupt(reason));
        }
        state.replicas = settings.replicas;
        if settings.liveness.len() > ACTIVE_NODES_MAX * 4 {
            let reason = format!("{} nodes marked down or up", settings.liveness.len());
            return Err(records.corrupt(reason));
        }
        for (id, down, epoch) in settings.liveness {
            state.liveness.insert(id, crate::state::Liveness { down, epoch });
        }
    }
    if records.at != data.len() {
        let reason = format!("{} bytes after the snapshot's last record", data.len() - records.at);
        return Err(records.corrupt(reason));
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{self, Command};
    use crate::state::{key_hash, Tier};

    /// A state of `n` tenants (every third purged after archiving), two handoffs and a node.
    fn state_of(n: usize) -> RegistryState {
        let mut state = RegistryState::default();
        let apply = |state: &mut RegistryState, cmd| command::apply(state, cmd).expect("applies");
        apply(&mut state, Command::NodeJoin { id: 1, addr: "a:1".into() });
        apply(&mut state, Command::ChangeReplicas { replicas: 3 });
        apply(&mut state, Command::NodeActivate { id: 1 });
        apply(&mut state, Command::MarkDown { id: 1 });
        for i in 0..n {
            let id = format!("t{i:05}");
            let record = TenantRecord::new(id.clone(), Tier::Free, key_hash(&id), i as u64);
            apply(&mut state, Command::AddTenant(record));
            if i % 3 == 0 {
                apply(&mut state, Command::ArchiveTenant { id: id.clone() });
                apply(&mut state, Command::PurgeTenant { id });
            }
        }
        for (tenant, epoch) in [("t00001", 4), ("t00002", 5)] {
            state.load_handoff(Handoff { tenant: tenant.into(), from: 1, to: 2, epoch });
        }
        state
    }

    /// Splits an image into its records' payloads.
    fn payloads(image: &[u8]) -> Vec<&[u8]> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some((payload, used)) = disk::parse_frame(&image[at..]) {
            out.push(payload);
            at += used;
        }
        assert_eq!(at, image.len(), "an image is whole records");
        out
    }

    #[test]
    fn an_image_of_many_records_round_trips() {
        // Goal: a state whose lists span many records (7 tenants per record here, standing for
        // 10,000) reads back equal, and with the same bytes whatever the chunking's remainder.
        let state = state_of(100);
        for chunk in [1, 7, 66, 1000] {
            let image = encode_state_chunked(&state, chunk).expect("encodes");
            let decoded = decode_state(Path::new("snapshot"), &image).expect("decodes");
            assert_eq!(decoded, state, "chunk {chunk}");
        }
        let image = encode_state_chunked(&state, 7).expect("encodes");
        // 66 tenants → 10 records, 2 handoffs → 1, 34 purged → 5, the header and the settings.
        assert_eq!(payloads(&image).len(), 1 + 10 + 1 + 5 + 1);
        let empty = RegistryState::default();
        let image = encode_state(&empty).expect("encodes");
        assert_eq!(decode_state(Path::new("snapshot"), &image).expect("decodes"), empty);
    }

    #[test]
    fn an_image_of_version_4_reads_with_one_replica() {
        // Goal: an image written before the settings record (version 4: no last record) is
        // still read, as a cluster of R = 1; one of version 5 keeps its R.
        let state = state_of(10);
        let image = encode_state_chunked(&state, 4).expect("encodes");
        let mut records = payloads(&image);
        records.pop();
        let mut header: Header = disk::decode(Path::new("h"), records[0]).expect("decodes");
        header.format_version = 4;
        let header = disk::encode("header", &header).expect("encodes");
        let mut old = disk::frame(&header);
        for payload in &records[1..] {
            old.extend(disk::frame(payload));
        }
        let decoded = decode_state(Path::new("snapshot"), &old).expect("decodes");
        assert_eq!(decoded.replicas(), 1);
        let mut expected = state.clone();
        expected.replicas = 1;
        expected.liveness = Default::default();
        assert_eq!(decoded, expected);
        let decoded = decode_state(Path::new("snapshot"), &image).expect("decodes");
        assert_eq!(decoded.replicas(), 3);
        assert!(decoded.is_down(1), "the marks are kept");
    }

    #[test]
    fn a_snapshot_larger_than_one_record_is_written_and_read() {
        // Goal: an image larger than the record limit (here the limit over 16, as the chunk of
        // 10,000 tenants is the record over 16) has no record past that limit and reads back.
        let state = state_of(300);
        let chunk = 8;
        let image = encode_state_chunked(&state, chunk).expect("encodes");
        let record_max = payloads(&image).iter().map(|p| p.len()).max().unwrap_or(0);
        assert!(image.len() > 16 * record_max, "{} vs {record_max}", image.len());
        assert_eq!(decode_state(Path::new("snapshot"), &image).expect("decodes"), state);
    }

    #[test]
    fn a_damaged_image_is_refused_by_name() {
        // Goal: an image cut anywhere, with a byte flipped, with bytes after its end, of another
        // version or claiming more ids than the limit is refused, naming what is wrong.
        let origin = Path::new("received snapshot");
        let image = encode_state_chunked(&state_of(20), 4).expect("encodes");
        let refused = |bytes: &[u8]| match decode_state(origin, bytes) {
            Err(e @ StoreError::Corrupt { .. }) => e.to_string(),
            other => panic!("not refused as corrupt: {:?}", other.map(|_| ())),
        };
        for cut in 0..image.len() {
            let e = refused(&image[..cut]);
            assert!(e.starts_with("received snapshot: corrupt: snapshot "), "{e}");
            assert!(e.contains("is torn"), "{e}");
        }
        let mut flipped = image.clone();
        flipped[image.len() / 2] ^= 0x04;
        assert!(refused(&flipped).contains("is torn"));
        let mut longer = image.clone();
        longer.extend(disk::frame(b"x"));
        assert!(refused(&longer).contains("9 bytes after the snapshot's last record"));

        let header = |version, tenants: u64| {
            let h = Header {
                format_version: version,
                tenants,
                handoffs: 0,
                purged: 0,
                admin_key_hash: None,
                nodes: Vec::new(),
                placement_epoch: 0,
            };
            disk::frame(&disk::encode("header", &h).expect("encodes"))
        };
        assert!(refused(&header(3, 0)).contains("snapshot format 3 (we read 4 to 5)"));
        let over = refused(&header(SNAPSHOT_FORMAT_VERSION, TENANT_IDS_MAX as u64 + 1));
        assert!(over.contains("4000001 tenant ids"), "{over}");
        let mut short = header(SNAPSHOT_FORMAT_VERSION, 2);
        short.extend(disk::frame(&disk::encode("t", &Vec::<TenantRecord>::new()).expect("enc")));
        assert!(refused(&short).contains("snapshot tenants record of 0 items, 2 left"));
    }
}
