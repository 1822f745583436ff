//! A machine's disk, in memory, with the durability rules of a real one.
//!
//! Files and directories are nodes with identities, as inodes are: renaming a directory moves
//! everything under it, and a file handle keeps writing to its file whatever it is called now.
//! Each file remembers what its last `fsync` made durable; each directory remembers the entries
//! its last `fsync` made durable. [`SimDisk::crash`] keeps exactly that, plus (by the seed) some
//! of what was never synced: a prefix of the unsynced tail of a file (a torn write), sometimes
//! with zeroes after it, or a directory's newer entries (the journal happened to commit).
//!
//! Faults: a full disk refuses writes (after writing part of them) and sometimes an fsync; a
//! slow disk charges simulated time for every operation ([`take_debt_ms`]); a crashed disk
//! answers everything with `EIO` until [`SimDisk::restart`], and the dead process's handles and
//! view ([`ProcessDisk`]) for good, as a dead process writes nothing.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Component, Path};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::rng::Rng;

mod process;
pub use process::ProcessDisk;

/// Chance, in permille, that a crash keeps nothing a file did not sync.
const CRASH_DROP_UNSYNCED_PERMILLE: u64 = 500;
/// Chance, in permille, that a torn tail is followed by zeroes (space allocated, never written).
const CRASH_ZERO_TAIL_PERMILLE: u64 = 150;
/// The most zero bytes a crash leaves after a torn tail.
const CRASH_ZERO_TAIL_BYTES_MAX: u64 = 600;
/// Chance, in permille, that a directory's unsynced entries survive a crash.
const CRASH_KEEP_DIR_ENTRIES_PERMILLE: u64 = 300;
/// Chance, in permille, that an fsync fails on a full disk (delayed allocation finds no room).
const FULL_SYNC_FAIL_PERMILLE: u64 = 300;

/// A healthy disk's time for one piece of store work, in milliseconds: the wait before its
/// effect lands and after it (`node::blocking`), so that requests, handoffs and checkpoints
/// overlap as they do on a real disk.
const LATENCY_MS: (u64, u64) = (1, 3);
/// Chance, in permille, that one piece of store work waits much longer (a queue behind it).
const LATENCY_SPIKE_PERMILLE: u64 = 30;
/// How long such a wait is, in milliseconds.
const LATENCY_SPIKE_MS: (u64, u64) = (5, 40);

thread_local! {
    /// Simulated milliseconds of slow-disk time charged since last taken, on this thread.
    static DEBT_MS: Cell<u64> = const { Cell::new(0) };
    /// The run's draws of disk latency, on this thread.
    static LATENCY: Cell<Option<Rng>> = const { Cell::new(None) };
}

/// Takes the slow-disk time charged on this thread since the last call.
pub fn take_debt_ms() -> u64 {
    DEBT_MS.with(|d| d.replace(0))
}

/// Starts this thread's disk latency draws for a run (`None` after it).
pub fn seed_latency(rng: Option<Rng>) {
    LATENCY.with(|l| l.set(rng));
}

/// The time the next piece of store work takes on this thread: the slow-disk debt so far plus
/// a healthy disk's latency.
pub fn next_work_ms() -> u64 {
    let latency = LATENCY.with(|l| {
        let Some(mut rng) = l.take() else { return 0 };
        let ms = if rng.chance(LATENCY_SPIKE_PERMILLE) {
            rng.range(LATENCY_SPIKE_MS.0, LATENCY_SPIKE_MS.1)
        } else {
            rng.range(LATENCY_MS.0, LATENCY_MS.1)
        };
        l.set(Some(rng));
        ms
    });
    take_debt_ms().saturating_add(latency)
}

fn charge(ms: u64) {
    if ms > 0 {
        DEBT_MS.with(|d| d.set(d.get().saturating_add(ms)));
    }
}

#[derive(Debug, Default)]
struct FileNode {
    data: Vec<u8>,
    /// Bytes of `data` the last sync made durable, while `data` only grew since.
    synced_len: usize,
    /// The durable content, kept when `data` was cut or rewritten below it since the last sync.
    old_synced: Option<Vec<u8>>,
}

impl FileNode {
    fn durable(&self) -> &[u8] {
        self.old_synced.as_deref().unwrap_or(&self.data[..self.synced_len])
    }

    /// Cuts `data` to `len`, first keeping the durable content if the cut reaches into it.
    fn cut(&mut self, len: usize) {
        if len < self.synced_len && self.old_synced.is_none() {
            self.old_synced = Some(self.data[..self.synced_len].to_vec());
        }
        self.data.resize(len, 0);
        self.synced_len = self.synced_len.min(len);
    }
}

#[derive(Debug, Default, Clone)]
struct DirNode {
    live: BTreeMap<String, u64>,
    durable: BTreeMap<String, u64>,
}

#[derive(Debug)]
enum Node {
    File(FileNode),
    Dir(DirNode),
}

/// What the fault schedule has done to the disk.
#[derive(Debug, Default, Clone, Copy)]
pub struct DiskFaults {
    pub full: bool,
    /// Simulated milliseconds each operation costs.
    pub slow_ms: u64,
}

struct Inner {
    nodes: BTreeMap<u64, Node>,
    next_id: u64,
    /// Bumped by every crash; handles of an older generation belong to a dead process.
    generation: u64,
    crashed: bool,
    faults: DiskFaults,
    rng: Rng,
}

const ROOT: u64 = 0;

pub struct SimDisk {
    inner: Mutex<Inner>,
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{} does not exist", path.display()))
}

fn eio() -> io::Error {
    io::Error::other("EIO: the process using this disk crashed")
}

fn enospc() -> io::Error {
    io::Error::new(io::ErrorKind::StorageFull, "ENOSPC: no space left on device")
}

/// The names along a path, root first.
fn components(path: &Path) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => names.push(n.to_string_lossy().into_owned()),
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("unsupported path {}", path.display()),
                ))
            }
        }
    }
    Ok(names)
}

impl Inner {
    fn dir(&self, id: u64) -> Option<&DirNode> {
        match self.nodes.get(&id) {
            Some(Node::Dir(d)) => Some(d),
            _ => None,
        }
    }

    fn dir_mut(&mut self, id: u64) -> Option<&mut DirNode> {
        match self.nodes.get_mut(&id) {
            Some(Node::Dir(d)) => Some(d),
            _ => None,
        }
    }

    fn file_mut(&mut self, id: u64) -> io::Result<&mut FileNode> {
        match self.nodes.get_mut(&id) {
            Some(Node::File(f)) => Ok(f),
            _ => Err(io::Error::other("not a file")),
        }
    }

    fn lookup(&self, path: &Path) -> io::Result<Option<u64>> {
        let mut at = ROOT;
        for name in components(path)? {
            let Some(dir) = self.dir(at) else { return Ok(None) };
            match dir.live.get(&name) {
                Some(id) => at = *id,
                None => return Ok(None),
            }
        }
        Ok(Some(at))
    }

    /// The directory holding `path`, and `path`'s last name.
    fn parent(&self, path: &Path) -> io::Result<(u64, String)> {
        let mut names = components(path)?;
        let name = names
            .pop()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the root has no parent"))?;
        let mut at = ROOT;
        for n in names {
            at = *self.dir(at).and_then(|d| d.live.get(&n)).ok_or_else(|| not_found(path))?;
        }
        if self.dir(at).is_none() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is under a file", path.display()),
            ));
        }
        Ok((at, name))
    }

    fn add(&mut self, node: Node) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.nodes.insert(id, node);
        id
    }

    fn link(&mut self, dir: u64, name: String, id: u64) {
        if let Some(d) = self.dir_mut(dir) {
            d.live.insert(name, id);
        }
    }

    /// Charges the slow-disk time of one operation and refuses anything once crashed.
    fn check(&self) -> io::Result<()> {
        charge(self.faults.slow_ms);
        if self.crashed {
            return Err(eio());
        }
        Ok(())
    }
}

impl SimDisk {
    pub fn new(rng: Rng) -> Arc<SimDisk> {
        let mut nodes = BTreeMap::new();
        nodes.insert(ROOT, Node::Dir(DirNode::default()));
        let inner = Inner {
            nodes,
            next_id: ROOT + 1,
            generation: 0,
            crashed: false,
            faults: DiskFaults::default(),
            rng,
        };
        Arc::new(SimDisk { inner: Mutex::new(inner) })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_faults(&self, faults: DiskFaults) {
        self.lock().faults = faults;
    }

    pub fn faults(&self) -> DiskFaults {
        self.lock().faults
    }

    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// The process using the disk died: from now on every operation fails until
    /// [`SimDisk::restart`]. On a power loss (`power_lost`) what survives is decided now, from what
    /// was synced and the seed; when only the process died, the OS keeps everything it wrote.
    pub fn crash(&self, power_lost: bool) {
        let mut inner = self.lock();
        inner.crashed = true;
        inner.generation += 1;
        if !power_lost {
            return;
        }
        let mut rng = inner.rng.fork();
        let mut kept: BTreeMap<u64, Node> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        let mut stack = vec![ROOT];
        while let Some(id) = stack.pop() {
            let Some(Node::Dir(d)) = inner.nodes.get(&id) else { continue };
            let mut entries = if rng.chance(CRASH_KEEP_DIR_ENTRIES_PERMILLE) {
                d.live.clone()
            } else {
                d.durable.clone()
            };
            // A directory renamed without syncing both parents may be named twice; keep one name.
            entries.retain(|_, child| seen.insert(*child));
            for child in entries.values() {
                match inner.nodes.get(child) {
                    Some(Node::Dir(_)) => stack.push(*child),
                    Some(Node::File(f)) => {
                        kept.insert(*child, Node::File(survivor(f, &mut rng)));
                    }
                    None => {}
                }
            }
            kept.insert(id, Node::Dir(DirNode { live: entries.clone(), durable: entries }));
        }
        inner.nodes = kept;
    }

    /// A new process may use the disk again, with whatever the crash left.
    pub fn restart(&self) {
        self.lock().crashed = false;
    }

    /// Forgets `path` and everything under it, durably, outside the fault model: the disk that
    /// held it died and was replaced by an empty one (its other files stand for other disks).
    pub fn lose(&self, path: &Path) -> io::Result<()> {
        let mut inner = self.lock();
        let (parent, name) = inner.parent(path)?;
        if let Some(d) = inner.dir_mut(parent) {
            d.live.remove(&name);
            d.durable.remove(&name);
        }
        Ok(())
    }

    /// Creates `path` and its parents, durably, outside the fault model: the machine's setup.
    pub fn provision_dir(&self, path: &Path) -> io::Result<()> {
        let mut inner = self.lock();
        let mut at = ROOT;
        for name in components(path)? {
            let existing = inner.dir(at).and_then(|d| d.live.get(&name).copied());
            let id = match existing {
                Some(id) => id,
                None => {
                    let id = inner.add(Node::Dir(DirNode::default()));
                    inner.link(at, name.clone(), id);
                    id
                }
            };
            if let Some(d) = inner.dir_mut(at) {
                d.durable.insert(name, id);
            }
            at = id;
        }
        Ok(())
    }

    /// Total bytes of file data, for the run's statistics.
    pub fn bytes(&self) -> u64 {
        self.lock()
            .nodes
            .values()
            .map(|n| if let Node::File(f) = n { f.data.len() as u64 } else { 0 })
            .sum()
    }
}

/// What of a file survives a crash: its durable content, perhaps plus part of the rest.
fn survivor(f: &FileNode, rng: &mut Rng) -> FileNode {
    let mut data = f.durable().to_vec();
    let appended_only = f.old_synced.is_none();
    if appended_only && f.data.len() > data.len() && !rng.chance(CRASH_DROP_UNSYNCED_PERMILLE) {
        let extra = rng.below((f.data.len() - data.len()) as u64 + 1) as usize;
        data.extend_from_slice(&f.data[f.synced_len..f.synced_len + extra]);
        if rng.chance(CRASH_ZERO_TAIL_PERMILLE) {
            data.resize(data.len() + rng.range(1, CRASH_ZERO_TAIL_BYTES_MAX) as usize, 0);
        }
    }
    let synced_len = data.len();
    FileNode { data, synced_len, old_synced: None }
}

/// A file open for writing, held by one process.
pub struct SimFile {
    disk: Arc<SimDisk>,
    id: u64,
    generation: u64,
}

impl SimFile {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> io::Result<R>) -> io::Result<R> {
        let mut inner = self.disk.lock();
        inner.check()?;
        if inner.generation != self.generation {
            return Err(eio());
        }
        f(&mut inner)
    }

    pub fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        let id = self.id;
        self.with(|inner| {
            let full = inner.faults.full;
            let part =
                if full { inner.rng.below(bytes.len() as u64 + 1) as usize } else { bytes.len() };
            inner.file_mut(id)?.data.extend_from_slice(&bytes[..part]);
            if full {
                return Err(enospc());
            }
            Ok(())
        })
    }

    pub fn sync(&mut self) -> io::Result<()> {
        let id = self.id;
        self.with(|inner| {
            if inner.faults.full && inner.rng.chance(FULL_SYNC_FAIL_PERMILLE) {
                return Err(enospc());
            }
            let f = inner.file_mut(id)?;
            f.synced_len = f.data.len();
            f.old_synced = None;
            Ok(())
        })
    }

    pub fn set_len(&mut self, len: u64) -> io::Result<()> {
        let id = self.id;
        self.with(|inner| {
            inner.file_mut(id)?.cut(len as usize);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests;
