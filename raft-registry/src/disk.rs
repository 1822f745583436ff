//! Disk primitives shared by the log, the vote file and snapshots: checksummed record framing,
//! bincode encoding, and atomic whole-file replacement.
//!
//! A record is `[len: u32 LE][crc32c(payload): u32 LE][payload]`. A record that is incomplete or
//! fails its checksum is "torn": a crash hit the middle of an append.
//!
//! Every file operation goes through [`Fs`], so the simulator can run the registry on a disk that
//! loses what was not synced; [`StdFs`] is the one implementation over `std::fs`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Bytes of the `len` + `crc` header in front of every record.
pub const RECORD_HEADER_BYTES: usize = 8;

/// Largest record payload accepted (64 MiB). A larger length field can only come from a torn or
/// corrupt header. A snapshot is many records (`crate::snapshot`), each far below this.
pub const RECORD_PAYLOAD_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Suffix of the temporary file written before an atomic rename.
const TMP_SUFFIX: &str = ".tmp";

/// A file open for writing: appends go to its end.
pub trait FsFile: Send {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Makes the written bytes and the length durable (`fdatasync`).
    fn sync_data(&mut self) -> io::Result<()>;
    /// Makes the data and all metadata durable (`fsync`).
    fn sync_all(&mut self) -> io::Result<()>;
    /// Cuts (or zero-extends) the file to `len` bytes; later appends go to the new end.
    fn set_len(&mut self, len: u64) -> io::Result<()>;
}

/// The file operations the registry uses: the disk seam.
pub trait Fs: Send + Sync {
    /// Creates `dir` and its missing parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    fn exists(&self, path: &Path) -> io::Result<bool>;
    /// The whole file; `NotFound` if it does not exist.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Creates a file, or empties an existing one, for writing.
    fn create(&self, path: &Path) -> io::Result<Box<dyn FsFile>>;
    /// Opens a file for appending, creating it if missing.
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn FsFile>>;
    /// Replaces `to` with `from` atomically.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creations, renames) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// [`Fs`] over `std::fs`.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdFs;

struct StdFile(File);

impl FsFile for StdFile {
    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.0.write_all(bytes)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn sync_all(&mut self) -> io::Result<()> {
        self.0.sync_all()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}

impl Fs for StdFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }
    fn exists(&self, path: &Path) -> io::Result<bool> {
        path.try_exists()
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }
    fn create(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        let file = OpenOptions::new().write(true).create(true).truncate(true).open(path)?;
        Ok(Box::new(StdFile(file)))
    }
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        Ok(Box::new(StdFile(OpenOptions::new().create(true).append(true).open(path)?)))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir).and_then(|d| d.sync_all())
    }
}

/// The production disk, shared.
pub fn std_fs() -> Arc<dyn Fs> {
    Arc::new(StdFs)
}

/// A failure of the registry's own files.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: io::Error },
    #[error("{path}: corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot encode {what}: {reason}")]
    Encode { what: &'static str, reason: String },
    #[error(
        "{path}: holds registry files of format {found}; this sq-cloud reads format {expected} \
         (raft-registry/src/format.rs says what changed)"
    )]
    Format { path: PathBuf, found: u32, expected: u32 },
}

/// Attaches the operation and path to an I/O error.
pub fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { op, path: path.to_path_buf(), source }
}

pub(crate) fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<RECORD_PAYLOAD_BYTES_MAX>()
}

/// Encodes `value` with bincode 2 (serde, standard config).
pub fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    bincode::serde::encode_to_vec(value, bincode_config())
        .map_err(|e| StoreError::Encode { what, reason: e.to_string() })
}

/// Decodes a whole payload; trailing bytes are corruption. Claims (allocates) at most
/// [`proto::wire::decode_claim_budget`] bytes: a forged length prefix in a short record must not
/// make this side allocate up to the whole limit.
pub fn decode<T: DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt { path: path.to_path_buf(), reason };
    let (value, used) = proto::wire::decode_bounded::<T, RECORD_PAYLOAD_BYTES_MAX>(bytes)
        .map_err(|e| corrupt(e.to_string()))?;
    if used != bytes.len() {
        return Err(corrupt(format!("{} trailing bytes", bytes.len() - used)));
    }
    Ok(value)
}

/// Frames `payload` as one record.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(RECORD_HEADER_BYTES + payload.len());
    append_frame(&mut out, payload);
    out
}

/// Appends `payload` to `out` as one record.
pub fn append_frame(out: &mut Vec<u8>, payload: &[u8]) {
    assert!(
        payload.len() <= RECORD_PAYLOAD_BYTES_MAX,
        "record of {} bytes exceeds the limit",
        payload.len()
    );
    // Cannot truncate: the assert above bounds the length far below u32::MAX.
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Parses the record at the start of `buf`: `Some((payload, record_len))`, or `None` when the
/// record is torn (incomplete, oversized or failing its checksum).
pub fn parse_frame(buf: &[u8]) -> Option<(&[u8], usize)> {
    let header = buf.get(..RECORD_HEADER_BYTES)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > RECORD_PAYLOAD_BYTES_MAX {
        return None;
    }
    let payload = buf.get(RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + len)?;
    (crc32c::crc32c(payload) == crc).then_some((payload, RECORD_HEADER_BYTES + len))
}

/// Makes a rename or file creation in `dir` durable.
pub fn sync_dir(fs: &dyn Fs, dir: &Path) -> Result<(), StoreError> {
    fs.sync_dir(dir).map_err(io_err("fsync dir", dir))
}

/// Creates `dir` and its missing parents, syncing each parent after its new entry: until then a
/// crash may forget the directory, and the vote and log inside it with it.
pub fn create_dir_durable(fs: &dyn Fs, dir: &Path) -> Result<(), StoreError> {
    let mut missing = Vec::new();
    let mut at = Some(dir);
    while let Some(p) = at {
        if p.as_os_str().is_empty() || fs.exists(p).map_err(io_err("stat", p))? {
            break;
        }
        missing.push(p);
        at = p.parent();
    }
    for p in missing.into_iter().rev() {
        fs.create_dir_all(p).map_err(io_err("create dir", p))?;
        match p.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => sync_dir(fs, parent)?,
            _ => sync_dir(fs, Path::new("."))?,
        }
    }
    Ok(())
}

/// Replaces `dir/name` with `bytes` atomically: write a temp file, fsync, rename, fsync the dir.
/// After a crash the file holds either the old or the new content, never a mix.
pub fn write_atomic(fs: &dyn Fs, dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    write_atomic_parts(fs, dir, name, &[bytes])
}

/// [`write_atomic`] of the concatenation of `parts`, without making it in memory.
pub fn write_atomic_parts(
    fs: &dyn Fs,
    dir: &Path,
    name: &str,
    parts: &[&[u8]],
) -> Result<(), StoreError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}{TMP_SUFFIX}"));
    let mut file = fs.create(&tmp).map_err(io_err("create", &tmp))?;
    for part in parts {
        file.write_all(part).map_err(io_err("write", &tmp))?;
    }
    file.sync_all().map_err(io_err("fsync", &tmp))?;
    drop(file);
    fs.rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
    sync_dir(fs, dir)
}

/// Writes `value` as the single framed record of `dir/name`, atomically.
pub fn write_record_file<T: Serialize>(
    fs: &dyn Fs,
    dir: &Path,
    name: &'static str,
    value: &T,
) -> Result<(), StoreError> {
    let payload = encode(name, value)?;
    write_atomic(fs, dir, name, &frame(&payload))
}

/// Reads a file written by [`write_record_file`]; `Ok(None)` if it does not exist. A file that
/// fails its checksum is corrupt (atomic replacement never leaves a torn one).
pub fn read_record_file<T: DeserializeOwned>(
    fs: &dyn Fs,
    path: &Path,
) -> Result<Option<T>, StoreError> {
    let bytes = match fs.read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("read", path)(e)),
    };
    let corrupt =
        |reason: &str| StoreError::Corrupt { path: path.to_path_buf(), reason: reason.to_string() };
    let (payload, used) = parse_frame(&bytes).ok_or_else(|| corrupt("bad checksum or length"))?;
    if used != bytes.len() {
        return Err(corrupt("trailing bytes after the record"));
    }
    decode(path, payload).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip_and_torn_detection() {
        // Goal: a framed record parses back; every truncation and any flipped bit is torn.
        let rec = frame(b"hello registry");
        assert_eq!(parse_frame(&rec), Some((&b"hello registry"[..], rec.len())));
        for cut in 0..rec.len() {
            assert_eq!(parse_frame(&rec[..cut]), None, "cut at {cut}");
        }
        let mut flipped = rec.clone();
        flipped[RECORD_HEADER_BYTES + 3] ^= 0x10;
        assert_eq!(parse_frame(&flipped), None);
    }

    #[test]
    fn record_file_round_trip() -> anyhow::Result<()> {
        // Goal: an atomically written record file reads back; missing is None; garbage is Corrupt.
        let dir = tempfile::tempdir()?;
        assert!(read_record_file::<u64>(&StdFs, &dir.path().join("x"))
            .map_err(anyhow::Error::msg)?
            .is_none());
        write_record_file(&StdFs, dir.path(), "x", &42u64)?;
        assert_eq!(read_record_file::<u64>(&StdFs, &dir.path().join("x"))?, Some(42));
        fs::write(dir.path().join("x"), b"garbage!!")?;
        assert!(matches!(
            read_record_file::<u64>(&StdFs, &dir.path().join("x")),
            Err(StoreError::Corrupt { .. })
        ));
        Ok(())
    }
}
