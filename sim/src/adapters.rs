//! The simulated disk behind the two disk seams of a node: the tenant store's
//! [`node::store::Vfs`] and the registry's [`raft_registry::disk::Fs`].

use std::io;
use std::path::Path;

use crate::disk::{ProcessDisk, SimFile};

/// The tenant store's view of a process's disk.
pub struct StoreDisk(pub ProcessDisk);

struct StoreFile(SimFile);

impl node::store::VfsFile for StoreFile {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.write_all(bytes)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync()
    }
}

impl node::store::Vfs for StoreDisk {
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        self.0.create_dir(path)
    }
    fn exists(&self, path: &Path) -> io::Result<bool> {
        self.0.exists(path)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.0.list(dir)
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.0.read(path)
    }
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn node::store::VfsFile>> {
        Ok(Box::new(StoreFile(self.0.open(path, true, true, false)?)))
    }
    fn create(&self, path: &Path) -> io::Result<Box<dyn node::store::VfsFile>> {
        Ok(Box::new(StoreFile(self.0.open(path, true, false, true)?)))
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn node::store::VfsFile>> {
        Ok(Box::new(StoreFile(self.0.open(path, false, false, false)?)))
    }
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        self.0.truncate(path, len)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.0.rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.0.remove(path, false)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.0.sync_dir(dir)
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        self.0.remove(path, true)
    }
}

/// The registry's view of a process's disk.
pub struct RegistryDisk(pub ProcessDisk);

struct RegistryFile(SimFile);

impl raft_registry::disk::FsFile for RegistryFile {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.write_all(bytes)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync()
    }
    fn sync_all(&mut self) -> io::Result<()> {
        self.0.sync()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}

impl raft_registry::disk::Fs for RegistryDisk {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.0.create_dir_all(dir)
    }
    fn exists(&self, path: &Path) -> io::Result<bool> {
        self.0.exists(path)
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.0.read(path)
    }
    fn create(&self, path: &Path) -> io::Result<Box<dyn raft_registry::disk::FsFile>> {
        Ok(Box::new(RegistryFile(self.0.open(path, true, false, true)?)))
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn raft_registry::disk::FsFile>> {
        Ok(Box::new(RegistryFile(self.0.open(path, true, false, false)?)))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.0.rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.0.sync_dir(dir)
    }
}
