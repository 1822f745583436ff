//! Group commit for registry writes: every write waiting when a round starts goes into one log
//! entry ([`Command::Batch`]), so a burst of N concurrent writes costs one Raft round (one
//! append, one fsync on each node, one replication round trip) instead of N.
//!
//! One round is in flight at a time. Writes that arrive while it commits wait for the next
//! round, so the batch grows with the load by itself and a lone write still goes at once. A
//! round of one command is logged as that command, unwrapped.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::command::{Command, BATCH_COMMANDS_MAX};
use crate::error::RegistryError;
use crate::registry::{bounded, CommandResult};
use crate::types::Raft;

/// Writes that may wait for a round; one more waits for room (backpressure on the proposers,
/// never an unbounded queue). A few rounds' worth.
pub const WRITES_QUEUED_MAX: usize = 4 * BATCH_COMMANDS_MAX;

/// One write and where its outcome goes.
pub(crate) type Pending = (Command, oneshot::Sender<Result<CommandResult, RegistryError>>);

/// Held for writing, it stops new rounds (the one in flight finishes first): a leadership
/// transfer ([`crate::transfer`]) holds it while its target catches up and stands.
pub(crate) type Gate = Arc<tokio::sync::RwLock<()>>;

/// The sending side, held by [`crate::Registry`]; the rounds end when it is dropped.
pub(crate) fn start(raft: Raft, write_timeout: Duration, gate: Gate) -> mpsc::Sender<Pending> {
    let (tx, rx) = mpsc::channel(WRITES_QUEUED_MAX);
    tokio::spawn(rounds(raft, rx, write_timeout, gate));
    tx
}

async fn rounds(raft: Raft, mut rx: mpsc::Receiver<Pending>, write_timeout: Duration, gate: Gate) {
    while let Some(first) = rx.recv().await {
        let _open = gate.read().await;
        let mut round = vec![first];
        while round.len() < BATCH_COMMANDS_MAX {
            match rx.try_recv() {
                Ok(next) => round.push(next),
                Err(_) => break,
            }
        }
        commit_round(&raft, round, write_timeout).await;
    }
}

/// Commits one round and tells each writer its own outcome.
async fn commit_round(raft: &Raft, mut round: Vec<Pending>, limit: Duration) {
    if round.len() == 1 {
        let (command, reply) = round.remove(0);
        let _ = reply.send(write_one(raft, command, limit).await);
        return;
    }
    let (commands, replies): (Vec<Command>, Vec<_>) = round.into_iter().unzip();
    let written = bounded("write", limit, raft.client_write(Command::Batch(commands))).await;
    let answer = match written {
        Ok(Ok(resp)) => match resp.data.outcome {
            Ok(()) => Ok((resp.log_id.index, resp.data.placement_epoch, resp.data.batch)),
            Err(rejection) => Err(RegistryError::Rejected(rejection)),
        },
        Ok(Err(e)) => Err(RegistryError::from(e)),
        Err(e) => Err(e),
    };
    match answer {
        Ok((log_index, placement_epoch, outcomes)) => {
            assert_eq!(outcomes.len(), replies.len(), "one outcome per command of a batch");
            for (reply, outcome) in replies.into_iter().zip(outcomes) {
                let result = outcome
                    .map(|()| CommandResult { log_index, placement_epoch })
                    .map_err(RegistryError::Rejected);
                let _ = reply.send(result);
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.for_each_writer()));
            }
        }
    }
}

async fn write_one(
    raft: &Raft,
    command: Command,
    limit: Duration,
) -> Result<CommandResult, RegistryError> {
    let resp = bounded("write", limit, raft.client_write(command)).await??;
    resp.data.outcome?;
    Ok(CommandResult { log_index: resp.log_id.index, placement_epoch: resp.data.placement_epoch })
}
