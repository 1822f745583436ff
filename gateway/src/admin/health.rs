//! What a health read gathers beyond its first answer: every node reports only its own rebuild
//! after a lost tenant store, so the gateway collects them from the other nodes' answers of the
//! same round, waiting only for the nodes the first answer's gossip holds alive.

use std::net::SocketAddr;

use proto::admin::{AdminAnswer, HealthReport, RebuildProgress};
use proto::cluster::{NodeHealth, NodeResponse};

/// Adds a node's own rebuild, from its answer to `Health`, to `rebuilds`.
pub(super) fn own_rebuilds(
    answer: &Result<NodeResponse, crate::forward::CallError>,
    rebuilds: &mut Vec<RebuildProgress>,
) {
    if let Ok(NodeResponse::Admin { result: Ok(AdminAnswer::Health(theirs)), .. }) = answer {
        rebuilds.extend(theirs.rebuilds.iter().filter(|r| r.node == theirs.node).cloned());
    }
}

/// Takes the answers of `asks` still to come, gathering their rebuild progress, until every
/// node of `awaited` answered or a forward's time passed.
pub(super) async fn heard_from<F>(
    asks: &mut futures::stream::FuturesUnordered<F>,
    mut awaited: Vec<SocketAddr>,
    rebuilds: &mut Vec<RebuildProgress>,
) where
    F: std::future::Future<Output = (SocketAddr, Result<NodeResponse, crate::forward::CallError>)>,
{
    let others = tokio::time::sleep(crate::forward::FORWARD_TIMEOUT);
    tokio::pin!(others);
    while !awaited.is_empty() {
        tokio::select! {
            n = futures::StreamExt::next(asks) => match n {
                Some((addr, answer)) => {
                    awaited.retain(|a| *a != addr);
                    own_rebuilds(&answer, rebuilds);
                }
                None => break,
            },
            _ = &mut others => break,
        }
    }
}

/// Whether the node at `addr` is alive in `report`'s gossip; true for an address the report
/// does not list (a seed), which is then waited for as before.
pub(super) fn alive_in(report: &HealthReport, addr: SocketAddr) -> bool {
    report
        .nodes
        .iter()
        .find(|n| n.addr.parse::<SocketAddr>() == Ok(addr))
        .is_none_or(|n| n.health == NodeHealth::Alive)
}

#[cfg(test)]
mod tests {
    use proto::admin::{HandoffsReport, NodeInfo, RaftReport, RaftRole};
    use proto::cluster::NodeState;

    use super::*;

    fn node(id: u64, addr: &str, health: NodeHealth) -> NodeInfo {
        NodeInfo {
            id,
            addr: addr.into(),
            state: NodeState::Active,
            raft: RaftRole::Voter,
            health,
            tenants: 0,
            handoffs_in: 0,
            handoffs_out: 0,
        }
    }

    // Goal: a health read waits for the rebuild reports of the nodes its first answer's gossip
    // holds alive, and of addresses that answer does not list (seeds), but not of a node it
    // holds suspect or dead.
    #[test]
    fn only_nodes_alive_in_the_answer_are_waited_for() {
        let report = HealthReport {
            node: 1,
            raft: RaftReport {
                leader: Some(1),
                term: 2,
                commit_index: Some(5),
                last_log_index: Some(5),
                applied_index: 5,
            },
            placement_epoch: 1,
            replicas: 3,
            down: Vec::new(),
            under_replicated: 0,
            ring: vec![1, 2, 3, 4],
            nodes: vec![
                node(1, "127.0.0.1:7101", NodeHealth::Alive),
                node(2, "127.0.0.1:7102", NodeHealth::Suspect),
                node(3, "127.0.0.1:7103", NodeHealth::Dead),
                node(4, "127.0.0.1:7104", NodeHealth::Alive),
            ],
            gossip: Vec::new(),
            handoffs: HandoffsReport { pending: Vec::new(), pulling_here: Default::default() },
            rebuilds: Vec::new(),
        };
        let waited = |addr: &str| alive_in(&report, addr.parse().unwrap());
        assert!(waited("127.0.0.1:7101"));
        assert!(!waited("127.0.0.1:7102"), "a suspect node is not waited for");
        assert!(!waited("127.0.0.1:7103"), "a dead node is not waited for");
        assert!(waited("127.0.0.1:7104"));
        assert!(waited("127.0.0.1:7199"), "a seed the report does not list is waited for");
    }
}
