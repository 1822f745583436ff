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
    /// Node `id`'s health report of a healthy registry, listing `nodes` and `rebuilds`.
    fn report(id: u64, nodes: Vec<NodeInfo>, rebuilds: Vec<RebuildProgress>) -> HealthReport {
        HealthReport {
            node: id,
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
            nodes,
            gossip: Vec::new(),
            handoffs: HandoffsReport { pending: Vec::new(), pulling_here: Default::default() },
            rebuilds,
        }
    }

    #[test]
    fn only_nodes_alive_in_the_answer_are_waited_for() {
        let nodes = vec![
            node(1, "127.0.0.1:7101", NodeHealth::Alive),
            node(2, "127.0.0.1:7102", NodeHealth::Suspect),
            node(3, "127.0.0.1:7103", NodeHealth::Dead),
            node(4, "127.0.0.1:7104", NodeHealth::Alive),
        ];
        let report = report(1, nodes, Vec::new());
        let waited = |addr: &str| alive_in(&report, addr.parse().unwrap());
        assert!(waited("127.0.0.1:7101"));
        assert!(!waited("127.0.0.1:7102"), "a suspect node is not waited for");
        assert!(!waited("127.0.0.1:7103"), "a dead node is not waited for");
        assert!(waited("127.0.0.1:7104"));
        assert!(waited("127.0.0.1:7199"), "a seed the report does not list is waited for");
    }

    fn rebuild(node: u64) -> RebuildProgress {
        RebuildProgress {
            node,
            copies_total: 4,
            copies_left: 1,
            bytes_taken: 1024,
            elapsed_ms: 10,
            done: false,
        }
    }

    /// A node's answer to `Health`, reporting its own rebuild and another node's (which a
    /// health read must not take from it).
    fn answer(id: u64) -> Result<NodeResponse, crate::forward::CallError> {
        let report = report(id, Vec::new(), vec![rebuild(id), rebuild(id + 10)]);
        Ok(NodeResponse::Admin {
            result: Ok(AdminAnswer::Health(Box::new(report))),
            applied_index: 5,
        })
    }

    type Ask = std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = (SocketAddr, Result<NodeResponse, crate::forward::CallError>),
                > + Send,
        >,
    >;

    /// Node 2 answers at once; node 3 never does (frozen, or its packets lost).
    fn asks() -> futures::stream::FuturesUnordered<Ask> {
        let answering: Ask = Box::pin(async { (addr(2), answer(2)) });
        let silent: Ask = Box::pin(async {
            std::future::pending::<()>().await;
            (addr(3), answer(3))
        });
        [answering, silent].into_iter().collect()
    }

    fn addr(id: u64) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 7100 + id as u16))
    }

    // Goal: a health read does not wait for a silent node it was not told to wait for; it
    // returns once the nodes it waits for answered, with their own rebuilds and no other's.
    #[tokio::test(start_paused = true)]
    async fn a_silent_node_not_awaited_holds_nothing_up() {
        let mut rebuilds = Vec::new();
        let started = tokio::time::Instant::now();
        heard_from(&mut asks(), vec![addr(2)], &mut rebuilds).await;
        assert_eq!(started.elapsed(), std::time::Duration::ZERO, "no time passed waiting");
        assert_eq!(rebuilds, vec![rebuild(2)]);
    }

    // Goal: a silent node that is waited for holds a health read up for one forward's time at
    // most, and the answers that came meanwhile still count.
    #[tokio::test(start_paused = true)]
    async fn a_silent_node_awaited_holds_it_up_for_one_forward_time() {
        let mut rebuilds = Vec::new();
        let started = tokio::time::Instant::now();
        heard_from(&mut asks(), vec![addr(2), addr(3)], &mut rebuilds).await;
        assert_eq!(started.elapsed(), crate::forward::FORWARD_TIMEOUT);
        assert_eq!(rebuilds, vec![rebuild(2)]);
    }
}
