//! Moving a tenant between nodes: the old owner lists and reads the tenant's files, the new owner
//! stages them and swaps them in at once.
//!
//! The old owner unloads the tenant first (a checkpoint), so its files are the whole tenant: its
//! canonical `.phext` files, any log segment a failed checkpoint left, and the usage roll-up.
//! Replaying a copied log over copied `.phext` files is harmless because log records are
//! idempotent (see [`super::wal`]). The new owner writes everything into a staging directory,
//! fsynced, then renames it over the tenant's directory: a crash leaves either the old directory
//! or the complete new one, and the handoff is simply pulled again.

use std::path::{Path, PathBuf};

use proto::cluster::HandoffFile;

use super::tenant::TenantPaths;
use super::{check_tenant_id, lock_slot, Store, StoreError};

/// Prefix of the staging directory of an incoming tenant, beside the tenants' directories. Not a
/// valid tenant id, so the store never mistakes it for one.
const STAGING_PREFIX: &str = ".incoming-";

/// Prefix under which a replaced tenant directory waits for deletion during a swap.
const REPLACED_PREFIX: &str = ".replaced-";

/// File in a tenant's root naming the placement epoch in which this node received the tenant by
/// handoff. The tenant can leave this node only in a later epoch, so a registry state of that
/// epoch or older (a node restarted from an old snapshot, or cut off) never makes its copy look
/// like a leftover.
const RECEIVED_FILE: &str = "received-epoch";

/// The most bytes read from a tenant file at once while listing or staging it: 4 MiB, so a file of
/// any size is checksummed and checked in bounded memory.
const FILE_READ_CHUNK_BYTES: usize = 4 << 20;

/// The subdirectories a tenant has; everything else in its root is a plain file.
const SUBDIRS: [&str; 2] = ["phexts", "wal"];

/// True when `path` names a file of a tenant's directory (a root file, or one in `phexts/` or
/// `wal/`), never a way out of it: what a handoff manifest may list.
pub fn is_tenant_file_path(path: &str) -> bool {
    safe_relative(path)
}

/// A path inside a tenant's directory is one of its files, never a way out of it.
fn safe_relative(path: &str) -> bool {
    let parts: Vec<&str> = path.split('/').collect();
    let ok_name = |n: &str| !n.is_empty() && n != "." && n != ".." && !n.contains('\\');
    match parts.as_slice() {
        [file] => ok_name(file),
        [dir, file] => SUBDIRS.contains(dir) && ok_name(file),
        _ => false,
    }
}

impl Store {
    /// Unloads `tenant` and lists its files. Empty when this node holds nothing of it.
    pub fn handoff_manifest(&self, tenant: &str) -> Result<Vec<HandoffFile>, StoreError> {
        check_tenant_id(tenant)?;
        self.unload(tenant)?;
        let paths = TenantPaths::new(&self.tenants_dir, tenant);
        if !self.vfs.exists(&paths.root).map_err(StoreError::io("stat tenant dir", &paths.root))? {
            return Ok(Vec::new());
        }
        let mut files = Vec::new();
        let mut names =
            self.vfs.list(&paths.root).map_err(StoreError::io("list tenant dir", &paths.root))?;
        names.sort();
        for name in names {
            if SUBDIRS.contains(&name.as_str()) {
                let dir = paths.root.join(&name);
                let mut inner =
                    self.vfs.list(&dir).map_err(StoreError::io("list tenant dir", &dir))?;
                inner.sort();
                for file in inner.into_iter().filter(|f| !f.ends_with(".tmp")) {
                    files.push(self.describe(&paths.root, &format!("{name}/{file}"))?);
                }
            } else if !name.ends_with(".tmp") {
                files.push(self.describe(&paths.root, &name)?);
            }
        }
        Ok(files)
    }

    pub(super) fn describe(&self, root: &Path, rel: &str) -> Result<HandoffFile, StoreError> {
        let path = root.join(rel);
        let (len, checksum) = self.file_checksum(&path)?;
        Ok(HandoffFile { path: rel.to_string(), len, checksum })
    }

    /// The length and xxh3-128 checksum ([`proto::doc::checksum`]) of a file,
    /// read in [`FILE_READ_CHUNK_BYTES`] ranges.
    fn file_checksum(&self, path: &Path) -> Result<(u64, String), StoreError> {
        let mut hasher = proto::doc::Checksum::new();
        let mut len = 0u64;
        loop {
            let part = self
                .vfs
                .read_range(path, len, FILE_READ_CHUNK_BYTES)
                .map_err(StoreError::io("read tenant file", path))?;
            hasher.update(&part);
            len += part.len() as u64;
            if part.len() < FILE_READ_CHUNK_BYTES {
                return Ok((len, hasher.finish()));
            }
        }
    }

    /// Up to `len` bytes of one listed file from `offset` (fewer only at its end), read from the
    /// disk as a range: a chunk never costs a read of the whole file.
    pub fn handoff_read(
        &self,
        tenant: &str,
        rel: &str,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, StoreError> {
        check_tenant_id(tenant)?;
        if !safe_relative(rel) {
            return Err(StoreError::InvalidRequest(format!("not a tenant file: {rel:?}")));
        }
        let path = TenantPaths::new(&self.tenants_dir, tenant).root.join(rel);
        self.vfs.read_range(&path, offset, len).map_err(StoreError::io("read tenant file", &path))
    }

    /// One listed file opened for reading in ranges, for a streamed transfer: its reader keeps
    /// the file it opened.
    pub fn handoff_open(
        &self,
        tenant: &str,
        rel: &str,
    ) -> Result<Box<dyn super::VfsReader>, StoreError> {
        check_tenant_id(tenant)?;
        if !safe_relative(rel) {
            return Err(StoreError::InvalidRequest(format!("not a tenant file: {rel:?}")));
        }
        let path = TenantPaths::new(&self.tenants_dir, tenant).root.join(rel);
        self.vfs.open_read(&path).map_err(StoreError::io("open tenant file", &path))
    }

    pub(super) fn staging(&self, tenant: &str) -> PathBuf {
        self.tenants_dir.join(format!("{STAGING_PREFIX}{tenant}"))
    }

    /// Starts receiving `tenant`: an empty staging directory.
    pub fn stage_begin(&self, tenant: &str) -> Result<(), StoreError> {
        check_tenant_id(tenant)?;
        let staging = self.staging(tenant);
        self.remove_tree(&staging)?;
        for dir in [staging.clone(), staging.join("phexts"), staging.join("wal")] {
            self.vfs.create_dir(&dir).map_err(StoreError::io("create staging dir", &dir))?;
        }
        self.vfs
            .sync_dir(&self.tenants_dir)
            .map_err(StoreError::io("sync tenants dir", &self.tenants_dir))
    }

    /// Writes one received piece of a file into the staging directory: the piece at `offset`
    /// 0 creates the file, every later one appends to it and must start where it ends. Nothing is
    /// held in memory beyond the piece, whatever the file's length.
    pub fn stage_file_part(
        &self,
        tenant: &str,
        file: &HandoffFile,
        offset: u64,
        bytes: &[u8],
    ) -> Result<(), StoreError> {
        check_tenant_id(tenant)?;
        if !safe_relative(&file.path) {
            return Err(StoreError::InvalidRequest(format!("not a tenant file: {:?}", file.path)));
        }
        if offset.saturating_add(bytes.len() as u64) > file.len {
            return Err(StoreError::InvalidRequest(format!("{} arrived too long", file.path)));
        }
        let path = self.staging(tenant).join(&file.path);
        let mut f = if offset == 0 {
            self.vfs.create(&path).map_err(StoreError::io("create staged file", &path))?
        } else {
            self.vfs.open_append(&path).map_err(StoreError::io("open staged file", &path))?
        };
        f.write_all(bytes).map_err(StoreError::io("write staged file", &path))
    }

    /// Checks a fully received file against its listing (length and checksum, re-read in
    /// ranges) and makes it durable. A damaged copy is refused and the handoff pulled again.
    pub fn stage_file_finish(&self, tenant: &str, file: &HandoffFile) -> Result<(), StoreError> {
        check_tenant_id(tenant)?;
        if !safe_relative(&file.path) {
            return Err(StoreError::InvalidRequest(format!("not a tenant file: {:?}", file.path)));
        }
        let path = self.staging(tenant).join(&file.path);
        if file.len == 0 {
            // No piece arrived to create it.
            drop(self.vfs.create(&path).map_err(StoreError::io("create staged file", &path))?);
        }
        let (len, checksum) = self.file_checksum(&path)?;
        if len != file.len || checksum != file.checksum {
            return Err(StoreError::InvalidRequest(format!("{} arrived damaged", file.path)));
        }
        let mut f =
            self.vfs.open_append(&path).map_err(StoreError::io("open staged file", &path))?;
        f.sync_data().map_err(StoreError::io("sync staged file", &path))
    }

    /// Records in the staged copy that it arrives with placement epoch `epoch` (replacing the
    /// old owner's own record, if the copy carried one).
    pub fn stage_received_epoch(&self, tenant: &str, epoch: u64) -> Result<(), StoreError> {
        check_tenant_id(tenant)?;
        let path = self.staging(tenant).join(RECEIVED_FILE);
        let mut f = self.vfs.create(&path).map_err(StoreError::io("create staged file", &path))?;
        f.write_all(epoch.to_string().as_bytes())
            .map_err(StoreError::io("write staged file", &path))?;
        f.sync_data().map_err(StoreError::io("sync staged file", &path))
    }

    /// The placement epoch in which this node received `tenant` by handoff; 0 if it never did
    /// (the tenant was created here) or holds nothing of it.
    pub fn received_epoch(&self, tenant: &str) -> Result<u64, StoreError> {
        check_tenant_id(tenant)?;
        let path = TenantPaths::new(&self.tenants_dir, tenant).root.join(RECEIVED_FILE);
        if !self.vfs.exists(&path).map_err(StoreError::io("stat tenant file", &path))? {
            return Ok(0);
        }
        let bytes = self.vfs.read(&path).map_err(StoreError::io("read tenant file", &path))?;
        std::str::from_utf8(&bytes)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| StoreError::corrupt(&path, "does not hold a placement epoch"))
    }

    /// Swaps the staged files in as the tenant's data, replacing whatever this node held of it.
    pub fn stage_commit(&self, tenant: &str) -> Result<(), StoreError> {
        check_tenant_id(tenant)?;
        self.unload(tenant)?;
        self.swap_staged(tenant)?;
        self.forget(tenant);
        self.remove_replaced(tenant)
    }

    /// Renames the staging directory, synced, over the tenant's directory (the old one set
    /// aside as replaced). The caller has the tenant unloaded and keeps it so.
    pub(super) fn swap_staged(&self, tenant: &str) -> Result<(), StoreError> {
        let staging = self.staging(tenant);
        for dir in [staging.join("phexts"), staging.join("wal"), staging.clone()] {
            self.vfs.sync_dir(&dir).map_err(StoreError::io("sync staging dir", &dir))?;
        }
        let root = TenantPaths::new(&self.tenants_dir, tenant).root;
        let replaced = self.tenants_dir.join(format!("{REPLACED_PREFIX}{tenant}"));
        self.remove_tree(&replaced)?;
        if self.vfs.exists(&root).map_err(StoreError::io("stat tenant dir", &root))? {
            self.vfs
                .rename(&root, &replaced)
                .map_err(StoreError::io("move old tenant dir", &root))?;
        }
        self.vfs.rename(&staging, &root).map_err(StoreError::io("install tenant dir", &staging))?;
        self.vfs
            .sync_dir(&self.tenants_dir)
            .map_err(StoreError::io("sync tenants dir", &self.tenants_dir))
    }

    /// Deletes the copy a swap set aside.
    pub(super) fn remove_replaced(&self, tenant: &str) -> Result<(), StoreError> {
        self.remove_tree(&self.tenants_dir.join(format!("{REPLACED_PREFIX}{tenant}")))
    }

    /// Drops what was staged for `tenant`, leaving its data as it was.
    pub fn stage_abort(&self, tenant: &str) -> Result<(), StoreError> {
        check_tenant_id(tenant)?;
        self.remove_tree(&self.staging(tenant))
    }

    /// Deletes this node's copy of a tenant it no longer owns.
    pub fn remove_tenant(&self, tenant: &str) -> Result<(), StoreError> {
        check_tenant_id(tenant)?;
        self.unload(tenant)?;
        let root = TenantPaths::new(&self.tenants_dir, tenant).root;
        self.remove_tree(&root)?;
        self.forget(tenant);
        Ok(())
    }

    /// Deletes everything this node holds of `tenant`: its directory, a copy half-received by a
    /// handoff (staged) and a replaced one waiting for deletion. For a purged tenant.
    pub fn remove_every_copy(&self, tenant: &str) -> Result<(), StoreError> {
        self.remove_tenant(tenant)?;
        self.remove_tree(&self.staging(tenant))?;
        self.remove_tree(&self.tenants_dir.join(format!("{REPLACED_PREFIX}{tenant}")))
    }

    /// The tenants this node holds anything of (a directory, a staged or a replaced copy),
    /// sorted and without repeats.
    pub fn held_tenants(&self) -> Result<Vec<String>, StoreError> {
        let mut ids: Vec<String> = self
            .vfs
            .list(&self.tenants_dir)
            .map_err(StoreError::io("list tenants", &self.tenants_dir))?
            .into_iter()
            .map(|name| {
                let id = name.strip_prefix(STAGING_PREFIX).or(name.strip_prefix(REPLACED_PREFIX));
                id.map_or(name.clone(), str::to_string)
            })
            .filter(|id| super::valid_tenant_id(id))
            .collect();
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// The tenants this node has a directory for, sorted.
    pub fn local_tenants(&self) -> Result<Vec<String>, StoreError> {
        let mut ids: Vec<String> = self
            .vfs
            .list(&self.tenants_dir)
            .map_err(StoreError::io("list tenants", &self.tenants_dir))?
            .into_iter()
            .filter(|id| super::valid_tenant_id(id))
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Drops everything the store remembers of a tenant, so its next use reads the disk afresh.
    /// Its slot stays, empty (slots are never removed: [`super::slots`]).
    fn forget(&self, tenant: &str) {
        self.forget_caught_up(tenant);
        let slot = self.slots.read().expect("slot map lock poisoned").get(tenant);
        if let Some(slot) = slot {
            let mut s = lock_slot(&slot);
            assert!(s.tenant.is_none(), "forgot a loaded tenant");
            s.storage_bytes = super::KnownBytes::UNKNOWN;
        }
    }

    /// Removes a tenant-shaped directory tree (root files, `phexts/`, `wal/`), if present.
    pub(super) fn remove_tree(&self, root: &Path) -> Result<(), StoreError> {
        if !self.vfs.exists(root).map_err(StoreError::io("stat dir", root))? {
            return Ok(());
        }
        for name in self.vfs.list(root).map_err(StoreError::io("list dir", root))? {
            let path = root.join(&name);
            if SUBDIRS.contains(&name.as_str()) {
                for file in self.vfs.list(&path).map_err(StoreError::io("list dir", &path))? {
                    let f = path.join(file);
                    self.vfs.remove_file(&f).map_err(StoreError::io("remove file", &f))?;
                }
                self.vfs.remove_dir(&path).map_err(StoreError::io("remove dir", &path))?;
            } else {
                self.vfs.remove_file(&path).map_err(StoreError::io("remove file", &path))?;
            }
        }
        self.vfs.remove_dir(root).map_err(StoreError::io("remove dir", root))?;
        self.vfs
            .sync_dir(&self.tenants_dir)
            .map_err(StoreError::io("sync tenants dir", &self.tenants_dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use proto::request::{parse, Method};

    fn store(dir: &Path) -> Store {
        let config =
            super::super::StoreConfig { data_dir: dir.to_path_buf(), ..Default::default() };
        Store::open(
            config,
            Arc::new(super::super::RealVfs),
            Arc::new(super::super::ManualClock::new(0)),
        )
        .unwrap()
    }

    fn run(s: &Store, tenant: &str, q: &str) -> String {
        let (route, query) = q.split_once('?').unwrap();
        let req = parse(Method::Get, route, query, b"").unwrap();
        String::from_utf8(s.execute(tenant, u64::MAX, &req).unwrap().body).unwrap()
    }

    // Goal: a tenant copied file by file from one store to another reads back identically,
    // replaces what the receiver held before, and the sender can then delete its copy.
    #[test]
    fn tenant_moves_between_stores() {
        let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (store(a_dir.path()), store(b_dir.path()));
        run(&a, "acme", "update?p=doc&c=1.1.1/1.1.1/1.1.1&s=one");
        run(&a, "acme", "insert?p=doc&c=1.1.1/1.1.1/1.1.1&s=+more");
        run(&a, "acme", "update?p=other&c=2.1.1/1.1.1/1.1.3&s=two");
        run(&b, "acme", "update?p=stale&c=1.1.1/1.1.1/1.1.1&s=old");
        let manifest = a.handoff_manifest("acme").unwrap();
        assert!(manifest.iter().any(|f| f.path == "phexts/doc.phext"), "{manifest:?}");
        b.stage_begin("acme").unwrap();
        // In pieces of 3 bytes, as ranged reads: each piece is read and staged on its own.
        for f in &manifest {
            let mut offset = 0;
            loop {
                let piece = a.handoff_read("acme", &f.path, offset, 3).unwrap();
                if piece.is_empty() {
                    break;
                }
                assert!(piece.len() == 3 || offset + piece.len() as u64 == f.len);
                b.stage_file_part("acme", f, offset, &piece).unwrap();
                offset += piece.len() as u64;
            }
            assert_eq!(offset, f.len);
            b.stage_file_finish("acme", f).unwrap();
        }
        let damaged = &manifest[0];
        let mut tampered = vec![b'x'; damaged.len as usize];
        tampered[0] = b'y';
        b.stage_file_part("acme", damaged, 0, &tampered).unwrap();
        assert!(b.stage_file_finish("acme", damaged).is_err(), "a damaged copy is refused");
        assert!(b.stage_file_part("acme", damaged, damaged.len, b"more").is_err(), "too long");
        b.stage_file_part(
            "acme",
            damaged,
            0,
            &a.handoff_read("acme", &damaged.path, 0, 1 << 20).unwrap(),
        )
        .unwrap();
        b.stage_file_finish("acme", damaged).unwrap();
        b.stage_commit("acme").unwrap();
        assert_eq!(run(&b, "acme", "get?p=doc"), run(&a, "acme", "get?p=doc"));
        assert_eq!(run(&b, "acme", "select?p=other&c=2.1.1/1.1.1/1.1.3"), "two");
        assert_eq!(run(&b, "acme", "get?p=stale"), "", "the receiver's old copy is replaced");
        assert_eq!(b.storage_bytes("acme").unwrap(), a.storage_bytes("acme").unwrap());
        a.remove_tenant("acme").unwrap();
        assert_eq!(a.local_tenants().unwrap(), Vec::<String>::new());
        assert_eq!(b.local_tenants().unwrap(), vec!["acme".to_string()]);
        assert!(a.handoff_read("acme", "../x", 0, 10).is_err());
    }

    // Goal: every copy of a tenant a node can hold (its directory, a half-received staged copy,
    // a replaced one left by a crash during a swap) is found and deleted, and no other tenant's.
    #[test]
    fn every_copy_of_a_tenant_is_found_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        run(&s, "acme", "update?p=doc&c=1.1.1/1.1.1/1.1.1&s=one");
        run(&s, "other", "update?p=doc&c=1.1.1/1.1.1/1.1.1&s=two");
        s.stage_begin("acme").unwrap();
        s.stage_begin("moving").unwrap();
        let replaced = dir.path().join(format!("tenants/{REPLACED_PREFIX}acme"));
        std::fs::create_dir_all(replaced.join("wal")).unwrap();
        let names = |s: &Store| s.held_tenants().unwrap();
        assert_eq!(names(&s), vec!["acme", "moving", "other"]);
        assert_eq!(s.local_tenants().unwrap(), vec!["acme", "other"]);
        s.remove_every_copy("acme").unwrap();
        s.remove_every_copy("moving").unwrap();
        assert_eq!(names(&s), vec!["other"]);
        let left: Vec<String> = std::fs::read_dir(dir.path().join("tenants"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, vec!["other"], "nothing of acme or moving is left");
        assert_eq!(run(&s, "other", "select?p=doc&c=1.1.1/1.1.1/1.1.1"), "two");
        s.remove_every_copy("never-here").unwrap();
    }
}
