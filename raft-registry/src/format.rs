//! The on-disk format of the registry directory, named in one small file.
//!
//! The log, the vote and the snapshot are bincode records of openraft's types. Those types
//! changed shape once: format 1 stored openraft's default leader ids (term, node), under which
//! several leaders may share a term; format 2 stores standard Raft leader ids (the term alone,
//! one leader per term, openraft's `single-term-leader`). Format 3 writes the snapshot file as
//! a record of its meta followed by its image as a sequence of records (`crate::snapshot`: a
//! header, then tenants, handoffs and purged ids at most 10,000 to a record), where format 2
//! wrote one record of meta and image together, which could not hold more than 64 MiB (about
//! 500,000 tenants). A record of one format cannot be read as another, and a guess could misread
//! it, so the directory says which format it holds and a node refuses, by name, a directory of
//! another format.

use std::path::Path;

use crate::disk::{self, Fs, StoreError};
use crate::log_store::{LOG_FILE, META_FILE};
use crate::state_machine::SNAPSHOT_FILE;

/// File that names the format of the registry directory.
pub const FORMAT_FILE: &str = "raft-format";

/// The format this build writes and reads.
pub const FORMAT: u32 = 3;

/// The format of a directory that holds registry files but no [`FORMAT_FILE`]: written before
/// the format was named.
const FORMAT_UNNAMED: u32 = 1;

/// Checks that `dir` holds registry files of [`FORMAT`], naming the format in a new or empty
/// directory. Call it before anything in `dir` is read.
pub fn check_or_name(fs: &dyn Fs, dir: &Path) -> Result<(), StoreError> {
    disk::create_dir_durable(fs, dir)?;
    let path = dir.join(FORMAT_FILE);
    let found = match disk::read_record_file::<u32>(fs, &path)? {
        Some(found) => found,
        None => {
            let mut holds_files = false;
            for name in [LOG_FILE, META_FILE, SNAPSHOT_FILE] {
                let file = dir.join(name);
                holds_files |= fs.exists(&file).map_err(disk::io_err("stat", &file))?;
            }
            if !holds_files {
                return disk::write_record_file(fs, dir, FORMAT_FILE, &FORMAT);
            }
            FORMAT_UNNAMED
        }
    };
    if found == FORMAT {
        Ok(())
    } else {
        Err(StoreError::Format { path: dir.to_path_buf(), found, expected: FORMAT })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::StdFs;

    #[test]
    fn a_new_directory_is_named_and_an_old_one_refused() -> anyhow::Result<()> {
        // Goal: a fresh directory gets the current format and opens again; a directory with a
        // log but no format file, or with another format, is refused with both formats named.
        let fresh = tempfile::tempdir()?;
        check_or_name(&StdFs, fresh.path())?;
        assert_eq!(
            disk::read_record_file::<u32>(&StdFs, &fresh.path().join(FORMAT_FILE))?,
            Some(FORMAT)
        );
        check_or_name(&StdFs, fresh.path())?;

        let old = tempfile::tempdir()?;
        std::fs::write(old.path().join(LOG_FILE), b"")?;
        let err = check_or_name(&StdFs, old.path()).err();
        assert!(
            matches!(err, Some(StoreError::Format { found: 1, expected: FORMAT, .. })),
            "{err:?}"
        );
        assert!(!old.path().join(FORMAT_FILE).exists(), "an old directory is left as it was");

        let other = tempfile::tempdir()?;
        disk::write_record_file(&StdFs, other.path(), FORMAT_FILE, &(FORMAT + 1))?;
        let err = check_or_name(&StdFs, other.path()).map_err(|e| e.to_string()).err();
        assert!(err.as_deref().is_some_and(|e| e.contains("format 4") && e.contains("format 3")));
        Ok(())
    }
}
