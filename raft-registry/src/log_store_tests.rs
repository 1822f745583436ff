use std::fs::{self, OpenOptions};
use std::io::Write;

use openraft::{CommittedLeaderId, EntryPayload};

use super::*;
use crate::command::Command;

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn entry(term: u64, index: u64) -> Entry {
    let cmd = Command::NodeJoin { id: index, addr: format!("10.0.0.{index}:7000") };
    Entry { log_id: log_id(term, index), payload: EntryPayload::Normal(cmd) }
}

async fn indexes(store: &mut LogStore) -> anyhow::Result<Vec<u64>> {
    let entries = store.try_get_log_entries(0..u64::MAX).await?;
    Ok(entries.iter().map(|e| e.log_id.index).collect())
}

#[tokio::test]
async fn restart_recovers_entries_vote_and_committed() -> anyhow::Result<()> {
    // Goal: entries, vote and committed id written before a restart are all there after it
    // (the committed id too: a node must never apply less after a restart than before it, see
    // the log store's documentation).
    let dir = tempfile::tempdir()?;
    {
        let mut store = LogStore::open(dir.path())?;
        store.append_sync((1..=5).map(|i| entry(1, i)))?;
        store.save_vote(&Vote::new_committed(3, 2)).await?;
        store.save_committed(Some(log_id(1, 4))).await?;
    }
    let mut store = LogStore::open(dir.path())?;
    assert_eq!(indexes(&mut store).await?, vec![1, 2, 3, 4, 5]);
    assert_eq!(store.read_vote().await?, Some(Vote::new_committed(3, 2)));
    assert_eq!(store.read_committed().await?, Some(log_id(1, 4)));
    let state = store.get_log_state().await?;
    assert_eq!(state.last_log_id, Some(log_id(1, 5)));
    assert_eq!(state.last_purged_log_id, None);
    Ok(())
}

#[tokio::test]
async fn torn_tail_is_discarded() -> anyhow::Result<()> {
    // Goal: a record cut short by a crash (and garbage after the last record) is dropped at open,
    // earlier records survive, and appends after recovery land right after them.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join(LOG_FILE);
    {
        let store = LogStore::open(dir.path())?;
        store.append_sync((1..=3).map(|i| entry(1, i)))?;
    }
    let full = fs::metadata(&path)?.len();
    {
        let store = LogStore::open(dir.path())?;
        store.append_sync([entry(1, 4)])?;
    }
    // Cut the 4th record in half, as a crash during its write would.
    let with_four = fs::metadata(&path)?.len();
    let f = OpenOptions::new().write(true).open(&path)?;
    f.set_len(full + (with_four - full) / 2)?;
    drop(f);

    let mut store = LogStore::open(dir.path())?;
    assert_eq!(indexes(&mut store).await?, vec![1, 2, 3]);
    assert_eq!(fs::metadata(&path)?.len(), full, "the torn tail is cut from the file");
    store.append_sync([entry(2, 4)])?;
    drop(store);

    // Trailing garbage (a header promising more than exists) is torn too.
    let mut f = OpenOptions::new().append(true).open(&path)?;
    f.write_all(&[0xff, 0x00, 0x00, 0x00, 1, 2, 3])?;
    drop(f);
    let mut store = LogStore::open(dir.path())?;
    assert_eq!(indexes(&mut store).await?, vec![1, 2, 3, 4]);
    let fourth = store.try_get_log_entries(4..5).await?;
    assert_eq!(fourth.first().map(|e| e.log_id), Some(log_id(2, 4)));
    Ok(())
}

#[tokio::test]
async fn truncate_and_purge_survive_restart() -> anyhow::Result<()> {
    // Goal: truncation and purging are durable: a restart sees exactly the remaining entries and
    // the last purged id, and appends continue consecutively.
    let dir = tempfile::tempdir()?;
    {
        let mut store = LogStore::open(dir.path())?;
        store.append_sync((1..=10).map(|i| entry(1, i)))?;
        store.truncate(log_id(1, 8)).await?;
        store.purge(log_id(1, 3)).await?;
        store.append_sync([entry(2, 8)])?;
    }
    let mut store = LogStore::open(dir.path())?;
    assert_eq!(indexes(&mut store).await?, vec![4, 5, 6, 7, 8]);
    let state = store.get_log_state().await?;
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 3)));
    assert_eq!(state.last_log_id, Some(log_id(2, 8)));

    // Purging past the last entry (after a snapshot install) leaves an empty log.
    store.purge(log_id(2, 20)).await?;
    drop(store);
    let mut store = LogStore::open(dir.path())?;
    assert!(indexes(&mut store).await?.is_empty());
    let state = store.get_log_state().await?;
    assert_eq!(state.last_log_id, Some(log_id(2, 20)));
    store.append_sync([entry(3, 21)])?;
    Ok(())
}

#[tokio::test]
async fn files_hold_no_clear_text_key() -> anyhow::Result<()> {
    // Goal: a key never reaches the log: only its hash does (the API takes hashes).
    let dir = tempfile::tempdir()?;
    let key = "pmb-v1-00112233445566778899aabbccddeeff";
    let cmd = Command::RotateKey { id: "acme".into(), new_hash: crate::key_hash(key) };
    let store = LogStore::open(dir.path())?;
    store.append_sync([Entry { log_id: log_id(1, 1), payload: EntryPayload::Normal(cmd) }])?;
    let bytes = fs::read(dir.path().join(LOG_FILE))?;
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(!contains(key.as_bytes()), "clear-text key in the log");
    assert!(contains(crate::key_hash(key).as_bytes()), "the hash is what is stored");
    Ok(())
}
