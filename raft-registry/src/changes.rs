//! The recent changes of the registry, by applied index: what gateways follow instead of the
//! whole registry.
//!
//! A gateway holds the registry as of some applied index. To bring it up to date, a node tells
//! it which tenants changed since that index, and the gateway takes only those. The log is
//! bounded ([`CHANGED_TENANTS_MAX`]): a caller further behind, or behind a change of placement
//! (which moves every tenant's owner), or behind the start of this process's log (a restart, an
//! installed snapshot) is told to take the whole registry instead.
//!
//! The log is not replicated: each node records what it applies. The registry at one applied
//! index is the same on every node, so the changes since an index a gateway learned from one
//! node are the same on every other.

use std::collections::{BTreeSet, VecDeque};

use crate::command::Command;

/// The most tenant ids the log remembers (about 60 B each, so about 3 MiB). Past it the oldest
/// entries go; a gateway behind them takes the whole registry. A gateway normally trails by
/// one long-poll round trip, a few hundred changes at the highest write rates.
pub const CHANGED_TENANTS_MAX: usize = 50_000;

/// What one applied entry changed, as far as a gateway is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Touched {
    /// These tenants' keys, status or existence.
    Tenants(Vec<String>),
    /// The active nodes, so potentially every tenant's owner.
    Placement,
}

/// What a caller at some index must take to be current.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Since {
    /// These tenants changed (or went); everything else is as the caller has it.
    Tenants(BTreeSet<String>),
    /// The log does not reach back far enough, or placement changed: take everything.
    Everything,
}

/// The bounded log of changes (see the module documentation).
#[derive(Debug, Default)]
pub struct ChangeLog {
    /// Every change after this index is in `entries`.
    complete_after: u64,
    entries: VecDeque<(u64, Touched)>,
    tenants: usize,
}

impl ChangeLog {
    /// An empty log whose state is the one at `index` (a snapshot's, or 0).
    pub fn starting_at(index: u64) -> ChangeLog {
        ChangeLog { complete_after: index, ..Default::default() }
    }

    /// Forgets everything: the state jumped to `index` (an installed snapshot).
    pub fn reset(&mut self, index: u64) {
        *self = ChangeLog::starting_at(index);
    }

    /// Records what the entry applied at `index` changed ([`touched`] of its command, taken
    /// before it was applied; only for an accepted command: a rejected one changed nothing).
    pub fn record(&mut self, index: u64, touched: Touched) {
        if let Touched::Tenants(ids) = &touched {
            self.tenants += ids.len();
        }
        self.entries.push_back((index, touched));
        while self.tenants > CHANGED_TENANTS_MAX {
            let Some((index, old)) = self.entries.pop_front() else { break };
            if let Touched::Tenants(ids) = old {
                self.tenants -= ids.len();
            }
            self.complete_after = index;
        }
    }

    /// What a caller whose state is the one at `known` must take to reach the state at `upto`.
    pub fn since(&self, known: u64, upto: u64) -> Since {
        if known < self.complete_after {
            return Since::Everything;
        }
        let mut changed = BTreeSet::new();
        // Entries are in index order: skip to the first after `known` without reading the
        // ones before it (the log holds up to CHANGED_TENANTS_MAX ids, and every gateway asks
        // after every commit).
        let first = self.entries.partition_point(|(i, _)| *i <= known);
        let after = self.entries.range(first..).take_while(|(i, _)| *i <= upto);
        for (_, touched) in after {
            match touched {
                Touched::Tenants(ids) => changed.extend(ids.iter().cloned()),
                Touched::Placement => return Since::Everything,
            }
        }
        Since::Tenants(changed)
    }
}

/// The tenants a command changes as a gateway sees them (keys, enabled, existence, owner);
/// `None` when it changes none of them (nodes and the admin key travel whole in every answer).
pub fn touched(command: &Command) -> Option<Touched> {
    let one = |id: &String| Some(Touched::Tenants(vec![id.clone()]));
    match command {
        Command::AddTenant(record) => one(&record.id),
        Command::UpdateTenant { id, .. }
        | Command::RotateKey { id, .. }
        | Command::DisableTenant { id }
        | Command::ArchiveTenant { id }
        | Command::PurgeTenant { id } => one(id),
        // With R > 1 the tenant's primary may change with its set (the entering node heads it,
        // or the leaving one led it).
        Command::HandoffDone { tenant, .. } => one(tenant),
        Command::NodeActivate { .. }
        | Command::NodeDrain { .. }
        | Command::MarkDown { .. }
        | Command::MarkUp { .. }
        | Command::MarkDownAfter { .. }
        | Command::MarkUpAfter { .. }
        | Command::StoreLost { .. } => Some(Touched::Placement),
        Command::SetAdminKeyHash { .. }
        | Command::NodeJoin { .. }
        | Command::NodeRemove { .. }
        | Command::SetReplicas { .. }
        | Command::ChangeReplicas { .. } => None,
        // Each command of a batch is recorded on its own, when it is applied.
        Command::Batch(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disable(id: &str) -> Touched {
        touched(&Command::DisableTenant { id: id.to_string() }).expect("touches a tenant")
    }

    fn ids(names: &[&str]) -> Since {
        Since::Tenants(names.iter().map(|n| n.to_string()).collect())
    }

    // Goal: the changes since an index are exactly the tenants touched after it and up to the
    // bound; a placement change, or an index before the log, asks for everything.
    #[test]
    fn since_names_what_changed_in_the_range() {
        let mut log = ChangeLog::starting_at(10);
        log.record(11, disable("a"));
        assert_eq!(touched(&Command::SetAdminKeyHash { hash: "h".into() }), None);
        log.record(13, disable("b"));
        log.record(14, disable("a"));
        assert_eq!(log.since(10, 14), ids(&["a", "b"]));
        assert_eq!(log.since(11, 13), ids(&["b"]));
        assert_eq!(log.since(14, 14), ids(&[]));
        assert_eq!(log.since(9, 14), Since::Everything, "before the log");
        log.record(15, touched(&Command::NodeDrain { id: 2 }).expect("placement"));
        log.record(16, disable("c"));
        assert_eq!(log.since(14, 16), Since::Everything, "placement changed");
        assert_eq!(log.since(15, 16), ids(&["c"]));
        log.reset(16);
        assert_eq!(log.since(15, 16), Since::Everything, "a snapshot replaced the state");
        assert_eq!(log.since(16, 16), ids(&[]));
    }

    // Goal: the log keeps at most CHANGED_TENANTS_MAX ids; a caller behind the dropped part is
    // told to take everything, one after it still gets only what changed.
    #[test]
    fn the_log_is_bounded() {
        let mut log = ChangeLog::starting_at(0);
        let total = CHANGED_TENANTS_MAX as u64 + 10;
        for i in 1..=total {
            log.record(i, disable(&format!("t{i}")));
        }
        assert_eq!(log.tenants, CHANGED_TENANTS_MAX);
        assert_eq!(log.since(5, total), Since::Everything);
        assert_eq!(
            log.since(total - 2, total),
            ids(&[&format!("t{}", total - 1), &format!("t{total}")])
        );
    }
}
