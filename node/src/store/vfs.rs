//! The disk seam: every file operation of the store goes through [`Vfs`].
//!
//! The store never calls `std::fs` itself, so the simulator can hand it an in-memory disk that
//! loses unsynced data and fails on command. [`RealVfs`] is the one implementation over `std::fs`.
//! The trait is as narrow as the store's needs: whole-file reads, append-only writers, rename,
//! and the two syncs that make data and directory entries durable.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;

/// A file open for writing at its end.
pub trait VfsFile: Send {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Makes the written bytes (and the file's length) durable: `fdatasync`.
    fn sync_data(&mut self) -> io::Result<()>;
}

/// A file open for reading at any offset. It keeps reading the file it opened even after the
/// path is replaced by a rename, so a reader sees one version from start to end.
pub trait VfsReader: Send {
    /// The file's length when it was opened.
    fn file_len(&self) -> u64;
    /// Up to `len` bytes from `offset`: fewer only where the file ends.
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>>;
}

/// A [`VfsReader`] over bytes read at open: what an in-memory disk gives.
struct BytesReader(Vec<u8>);

impl VfsReader for BytesReader {
    fn file_len(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(self.0.len());
        Ok(self.0[start..start.saturating_add(len).min(self.0.len())].to_vec())
    }
}

/// The file operations the store uses. Paths are absolute or relative to the process.
pub trait Vfs: Send + Sync {
    /// Creates one directory (its parent exists); an existing directory is not an error.
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    fn exists(&self, path: &Path) -> io::Result<bool>;
    /// The names of the entries of a directory, in no particular order.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Up to `len` bytes of a file from `offset`: fewer only where the file ends, none past it.
    /// For reading large files in bounded memory (handoff). The default reads the whole file,
    /// which suits an in-memory disk; [`RealVfs`] reads only the range.
    fn read_range(&self, path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let bytes = self.read(path)?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(bytes.len());
        let end = start.saturating_add(len).min(bytes.len());
        Ok(bytes[start..end].to_vec())
    }
    /// Opens a file for reading in ranges ([`VfsReader`]). The default reads it whole at open,
    /// which suits an in-memory disk; [`RealVfs`] keeps a handle and reads only the ranges.
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn VfsReader>> {
        Ok(Box::new(BytesReader(self.read(path)?)))
    }
    /// Creates a file that must not exist yet, for appending.
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn VfsFile>>;
    /// Creates a file, or empties an existing one, for writing.
    fn create(&self, path: &Path) -> io::Result<Box<dyn VfsFile>>;
    /// Opens an existing file for appending.
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn VfsFile>>;
    /// Cuts a file to `len` bytes.
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()>;
    /// Replaces `to` with `from` atomically.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creations, renames, removals) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Removes an empty directory. Only tenant handoff needs it; a disk that cannot do it says so.
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::Unsupported, format!("remove_dir {}", path.display())))
    }
    /// Makes `to` (which must not exist) a file with `from`'s bytes as they are now, unchanged by
    /// later replacements of `from` (which are renames over it): a snapshot's view of a file.
    /// Not made durable. The default copies in ranges; [`RealVfs`] makes a hard link.
    fn link(&self, from: &Path, to: &Path) -> io::Result<()> {
        const PIECE: usize = 4 << 20;
        let mut out = self.create_new(to)?;
        let mut at = 0u64;
        loop {
            let piece = self.read_range(from, at, PIECE)?;
            out.write_all(&piece)?;
            at += piece.len() as u64;
            if piece.len() < PIECE {
                return Ok(());
            }
        }
    }
}

/// [`Vfs`] over `std::fs`.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealVfs;

struct RealFile(File);

struct RealReader {
    file: File,
    len: u64,
}

impl VfsReader for RealReader {
    fn file_len(&self) -> u64 {
        self.len
    }
    fn read_at(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let want = usize::try_from(self.len.saturating_sub(offset)).unwrap_or(usize::MAX).min(len);
        let mut out = vec![0u8; want];
        let mut done = 0;
        while done < want {
            match self.file.read_at(&mut out[done..], offset + done as u64)? {
                0 => break,
                n => done += n,
            }
        }
        out.truncate(done);
        Ok(out)
    }
}

impl VfsFile for RealFile {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.write_all(bytes)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
}

impl Vfs for RealVfs {
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir(path)
    }

    fn link(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::hard_link(from, to)
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        match fs::create_dir(path) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
            other => other,
        }
    }
    fn exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(dir)? {
            // A name that is not UTF-8 was not written by the store; it is reported lossily so
            // the caller can refuse it.
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }
    fn read_range(&self, path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let file = File::open(path)?;
        let end = file.metadata()?.len();
        let want = usize::try_from(end.saturating_sub(offset)).unwrap_or(usize::MAX).min(len);
        let mut out = vec![0u8; want];
        let mut done = 0;
        while done < want {
            match file.read_at(&mut out[done..], offset + done as u64)? {
                0 => break,
                n => done += n,
            }
        }
        out.truncate(done);
        Ok(out)
    }
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn VfsReader>> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(Box::new(RealReader { file, len }))
    }
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn VfsFile>> {
        let f = OpenOptions::new().append(true).create_new(true).open(path)?;
        Ok(Box::new(RealFile(f)))
    }
    fn create(&self, path: &Path) -> io::Result<Box<dyn VfsFile>> {
        Ok(Box::new(RealFile(File::create(path)?)))
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn VfsFile>> {
        Ok(Box::new(RealFile(OpenOptions::new().append(true).open(path)?)))
    }
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        OpenOptions::new().write(true).open(path)?.set_len(len)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

/// A [`Vfs`] that forwards everything except the syncs, which it drops.
///
/// For benchmarks and measurements only: it shows what the store costs apart from the disk's
/// flush latency. Nothing written through it survives a power cut.
pub struct UnsyncedVfs(pub Arc<dyn Vfs>);

struct UnsyncedFile(Box<dyn VfsFile>);

impl VfsFile for UnsyncedFile {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.write_all(bytes)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Vfs for UnsyncedVfs {
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
    fn read_range(&self, path: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.0.read_range(path, offset, len)
    }
    fn open_read(&self, path: &Path) -> io::Result<Box<dyn VfsReader>> {
        self.0.open_read(path)
    }
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn VfsFile>> {
        Ok(Box::new(UnsyncedFile(self.0.create_new(path)?)))
    }
    fn create(&self, path: &Path) -> io::Result<Box<dyn VfsFile>> {
        Ok(Box::new(UnsyncedFile(self.0.create(path)?)))
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn VfsFile>> {
        Ok(Box::new(UnsyncedFile(self.0.open_append(path)?)))
    }
    fn truncate(&self, path: &Path, len: u64) -> io::Result<()> {
        self.0.truncate(path, len)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.0.rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.0.remove_file(path)
    }
    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }
    fn link(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.0.link(from, to)
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        self.0.remove_dir(path)
    }
}

/// Creates `dir` and any missing parents, syncing each parent after its new entry, so that the
/// directory survives a power cut once this returns. Existing directories cost one `exists` each.
pub(crate) fn create_dir_durable(vfs: &dyn Vfs, dir: &Path) -> io::Result<()> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(p) = at {
        if p.as_os_str().is_empty() || vfs.exists(p)? {
            break;
        }
        missing.push(p);
        at = p.parent();
    }
    for p in missing.into_iter().rev() {
        vfs.create_dir(p)?;
        match p.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => vfs.sync_dir(parent)?,
            _ => vfs.sync_dir(Path::new("."))?,
        }
    }
    Ok(())
}
