//! One process's view of a disk ([`ProcessDisk`]): the file operations the node's and the
//! registry's disk seams make, each refused once the process that took the view is dead.

use std::io;
use std::path::Path;
use std::sync::Arc;

use super::{components, eio, not_found, DirNode, FileNode, Inner, Node, SimDisk, SimFile};

/// One process's view of a disk, taken when it starts ([`SimDisk::process`]): once that
/// process dies, every operation through it fails with `EIO`, even after a new process started
/// on the disk. A dead process's tasks that are still finishing never write to its successor's
/// files.
#[derive(Clone)]
pub struct ProcessDisk {
    disk: Arc<SimDisk>,
    generation: u64,
}

impl SimDisk {
    /// The view of the process that uses the disk from now on.
    pub fn process(self: &Arc<Self>) -> ProcessDisk {
        ProcessDisk { disk: self.clone(), generation: self.generation() }
    }
}

/// The operations both seams need.
impl ProcessDisk {
    fn op<R>(&self, f: impl FnOnce(&mut Inner) -> io::Result<R>) -> io::Result<R> {
        let mut inner = self.disk.lock();
        inner.check()?;
        if inner.generation != self.generation {
            return Err(eio());
        }
        f(&mut inner)
    }

    pub fn create_dir(&self, path: &Path) -> io::Result<()> {
        self.op(|inner| {
            let (parent, name) = inner.parent(path)?;
            match inner.dir(parent).and_then(|d| d.live.get(&name)).copied() {
                Some(id) if inner.dir(id).is_some() => Ok(()),
                Some(_) => Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} is a file", path.display()),
                )),
                None => {
                    let id = inner.add(Node::Dir(DirNode::default()));
                    inner.link(parent, name, id);
                    Ok(())
                }
            }
        })
    }

    pub fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut at = std::path::PathBuf::from("/");
        for name in components(path)? {
            at.push(name);
            self.create_dir(&at)?;
        }
        Ok(())
    }

    pub fn exists(&self, path: &Path) -> io::Result<bool> {
        self.op(|inner| Ok(inner.lookup(path)?.is_some()))
    }

    pub fn list(&self, path: &Path) -> io::Result<Vec<String>> {
        self.op(|inner| {
            let id = inner.lookup(path)?.ok_or_else(|| not_found(path))?;
            let dir = inner
                .dir(id)
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotADirectory, "not a directory"))?;
            Ok(dir.live.keys().cloned().collect())
        })
    }

    pub fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        self.op(|inner| {
            let id = inner.lookup(path)?.ok_or_else(|| not_found(path))?;
            match inner.nodes.get(&id) {
                Some(Node::File(f)) => Ok(f.data.clone()),
                _ => Err(io::Error::other(format!("{} is a directory", path.display()))),
            }
        })
    }

    /// Opens a file: `truncate` empties an existing one; `must_be_new` refuses one; `create`
    /// makes a missing one.
    pub fn open(
        &self,
        path: &Path,
        create: bool,
        must_be_new: bool,
        truncate: bool,
    ) -> io::Result<SimFile> {
        let (id, generation) = self.op(|inner| {
            let (parent, name) = inner.parent(path)?;
            let existing = inner.dir(parent).and_then(|d| d.live.get(&name)).copied();
            let id = match existing {
                Some(_) if must_be_new => {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("{} exists", path.display()),
                    ))
                }
                Some(id) => {
                    let f = inner.file_mut(id)?;
                    if truncate {
                        f.cut(0);
                    }
                    id
                }
                None if !create => return Err(not_found(path)),
                None => {
                    let id = inner.add(Node::File(FileNode::default()));
                    inner.link(parent, name, id);
                    id
                }
            };
            Ok((id, inner.generation))
        })?;
        Ok(SimFile { disk: self.disk.clone(), id, generation })
    }

    pub fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        self.op(|inner| {
            let id = inner.lookup(path)?.ok_or_else(|| not_found(path))?;
            inner.file_mut(id)?.cut(len as usize);
            Ok(())
        })
    }

    pub fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.op(|inner| {
            let (from_dir, from_name) = inner.parent(from)?;
            let (to_dir, to_name) = inner.parent(to)?;
            let id = inner
                .dir_mut(from_dir)
                .and_then(|d| d.live.remove(&from_name))
                .ok_or_else(|| not_found(from))?;
            inner.link(to_dir, to_name, id);
            Ok(())
        })
    }

    /// Removes a file (`dir` false) or an empty directory (`dir` true).
    pub fn remove(&self, path: &Path, dir: bool) -> io::Result<()> {
        self.op(|inner| {
            let (parent, name) = inner.parent(path)?;
            let id = inner
                .dir(parent)
                .and_then(|d| d.live.get(&name))
                .copied()
                .ok_or_else(|| not_found(path))?;
            match (inner.nodes.get(&id), dir) {
                (Some(Node::Dir(d)), true) if !d.live.is_empty() => {
                    return Err(io::Error::new(
                        io::ErrorKind::DirectoryNotEmpty,
                        format!("{} is not empty", path.display()),
                    ))
                }
                (Some(Node::Dir(_)), true) | (Some(Node::File(_)), false) => {}
                _ => {
                    return Err(io::Error::other(format!(
                        "{} is not a {}",
                        path.display(),
                        if dir { "directory" } else { "file" }
                    )))
                }
            }
            if let Some(d) = inner.dir_mut(parent) {
                d.live.remove(&name);
            }
            Ok(())
        })
    }

    pub fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.op(|inner| {
            let id = inner.lookup(path)?.ok_or_else(|| not_found(path))?;
            let d = inner
                .dir_mut(id)
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotADirectory, "not a directory"))?;
            d.durable = d.live.clone();
            Ok(())
        })
    }
}
