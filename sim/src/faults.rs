//! The fault schedule: from one seed, a stream of partitions (both ways and one way), bad
//! network weather (loss, duplication, long delays), process crashes with restarts, frozen
//! processes (a SIGSTOP: everything they send or are sent waits until they resume), full and
//! slow disks, and clock jumps; with three copies, lost disks and primaries cut off from their
//! backups (both ways, or one way while their tenants move to another live node). Each fault is
//! undone after a while; [`heal`] undoes them all.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::disk::DiskFaults;
use crate::net::{Endpoint, Weather};
use crate::rng::Rng;
use crate::world::{pause_unless_stopped, World};

/// Pause between two faults, in milliseconds.
const FAULT_PAUSE_MS: (u64, u64) = (300, 2_500);
/// How long a fault lasts, in milliseconds.
const FAULT_LENGTH_MS: (u64, u64) = (500, 8_000);
/// The most node processes down at once.
const CRASHED_MAX: usize = 2;
/// A slow disk's cost per operation, in milliseconds.
const SLOW_DISK_MS: (u64, u64) = (2, 60);
/// Calendar clock steps, in milliseconds: up to a day and a half ahead, ten minutes back.
const WALL_JUMP_AHEAD_MS: u64 = 36 * 3_600_000;
const WALL_JUMP_BACK_MS: u64 = 600_000;
/// A paused machine's monotonic clock jump, in milliseconds.
const MONO_JUMP_MS: (u64, u64) = (1_000, 20_000);

#[derive(Debug, Clone, Copy)]
enum Kind {
    Partition,
    OneWay,
    Weather,
    Crash,
    Freeze,
    DiskFull,
    SlowDisk,
    ClockJump,
    DiskLoss,
    IsolatePrimary,
}

/// Each kind's weight. The kinds for replicated tenants come last with weight 0 unless R >= 3
/// (a lost disk would lose tenants for good with fewer copies), so that runs with R = 1 draw
/// as they always did.
const KINDS: [(Kind, u64); 10] = [
    (Kind::Partition, 20),
    (Kind::OneWay, 15),
    (Kind::Weather, 15),
    (Kind::Crash, 20),
    (Kind::Freeze, 10),
    (Kind::DiskFull, 10),
    (Kind::SlowDisk, 10),
    (Kind::ClockJump, 10),
    (Kind::DiskLoss, 0),
    (Kind::IsolatePrimary, 0),
];

/// The weights of [`Kind::DiskLoss`] and [`Kind::IsolatePrimary`] with R >= 3.
const DISK_LOSS_WEIGHT: u64 = 10;
const ISOLATE_PRIMARY_WEIGHT: u64 = 15;

/// Injects faults until `stop`. A disk is lost, or a primary cut from its backups, only while
/// the registry's R is 3 or more and as many nodes are active: with two copies, one lost disk
/// leaves no majority to lead, and a run that raises R from 2 to 3 meets those faults once the
/// raise is committed over three active nodes.
pub async fn run(world: Arc<World>, rng: Rng, stop: CancellationToken, replicas: u8) {
    // The moves draw from a stream of their own, so that the other faults come as they did
    // before the moves were added.
    let moves = Rng::new(rng.clone().next_u64() ^ MOVES_STREAM);
    tokio::join!(
        draw_faults(world.clone(), rng, stop.clone(), replicas),
        moves_under_cut_off_primaries(world, moves, stop, replicas),
    );
}

async fn draw_faults(world: Arc<World>, mut rng: Rng, stop: CancellationToken, replicas: u8) {
    let weights = |r_now: usize| -> Vec<u64> {
        let three = replicas >= 3 && r_now >= 3;
        KINDS
            .iter()
            .map(|(kind, w)| match kind {
                Kind::DiskLoss if three => DISK_LOSS_WEIGHT,
                Kind::IsolatePrimary if three => ISOLATE_PRIMARY_WEIGHT,
                _ => *w,
            })
            .collect()
    };
    while !stop.is_cancelled() {
        let pause = Duration::from_millis(rng.range(FAULT_PAUSE_MS.0, FAULT_PAUSE_MS.1));
        if !pause_unless_stopped(&stop, pause).await {
            return;
        }
        // The copies each tenant has: R, or fewer while fewer nodes are active.
        let r_now = world.registry_state().map_or(0, |s| s.replicas().min(s.active_nodes().len()));
        let kind = KINDS[rng.weighted(&weights(r_now))].0;
        let length = Duration::from_millis(rng.range(FAULT_LENGTH_MS.0, FAULT_LENGTH_MS.1));
        world.stats().faults += 1;
        inject(&world, &mut rng, kind, length, &stop);
    }
}

/// Tells the moves' stream of random numbers from the other faults'.
const MOVES_STREAM: u64 = 0x4D0F_E5C1_05ED_0001;
/// Pause between two looks for a tenant to move under a cut-off primary, in milliseconds.
const MOVE_PAUSE_MS: (u64, u64) = (1_000, 5_000);
/// When a returning head's old primary is cut off, in milliseconds after the head starts.
const RETURN_CUT_AFTER_MS: (u64, u64) = (0, 400);
/// How long a moved tenant's old primary hears no other node, in milliseconds.
const CUT_OFF_MS: (u64, u64) = (1_000, 5_000);

/// With R >= 3 and as many active nodes: now and then, a tenant whose primary can be moved at
/// once to another live node ([`Move`]) has it moved while the old primary hears no other node
/// ([`cut_off_and_move`]).
async fn moves_under_cut_off_primaries(
    world: Arc<World>,
    mut rng: Rng,
    stop: CancellationToken,
    replicas: u8,
) {
    if replicas < 3 {
        return;
    }
    while !stop.is_cancelled() {
        let pause = Duration::from_millis(rng.range(MOVE_PAUSE_MS.0, MOVE_PAUSE_MS.1));
        if !pause_unless_stopped(&stop, pause).await {
            return;
        }
        let Some(state) = world.registry_state() else { continue };
        if state.replicas().min(state.active_nodes().len()) < 3 {
            continue;
        }
        let disabled = world.disabled();
        let movable: Vec<(String, u64, Move)> = state
            .tenants()
            .filter(|t| t.enabled && !t.archived && !disabled.contains(&t.id.to_string()))
            .filter_map(|t| {
                let primary = state.primary_of(&t.id)?;
                Move::of(&world, &state, &t.id, primary).map(|how| (t.id.to_string(), primary, how))
            })
            .collect();
        if movable.is_empty() {
            continue;
        }
        let (tenant, primary, how) = rng.pick(&movable).clone();
        let g = rng.below(world.gateways.len() as u64);
        let length = Duration::from_millis(rng.range(CUT_OFF_MS.0, CUT_OFF_MS.1));
        world.stats().faults += 1;
        let after = match how {
            Move::Return(_) => rng.range(RETURN_CUT_AFTER_MS.0, RETURN_CUT_AFTER_MS.1),
            Move::Drain => 0,
        };
        let timing = (g, length, Duration::from_millis(after));
        cut_off_and_move(&world, &tenant, primary, how, timing, &stop).await;
        let to_new = (g as usize + 1) % world.gateways.len();
        // Awaited: one chase at a time (each cell has one writer), over before the heal.
        let gateways = (to_new, g as usize);
        crate::workload::chase(world.clone(), tenant, gateways, primary, rng.fork()).await;
    }
}

/// Runs `undo` after `length`, unless the run heals first (heal undoes everything anyway).
fn later(length: Duration, stop: &CancellationToken, undo: impl FnOnce() + Send + 'static) {
    let stop = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(length) => undo(),
        }
    });
}

fn endpoints(world: &World) -> Vec<Endpoint> {
    let mut all: Vec<Endpoint> = world.cluster.ids().into_iter().map(Endpoint::Node).collect();
    all.extend((0..world.gateways.len() as u64).map(Endpoint::Gateway));
    all
}

fn inject(
    world: &Arc<World>,
    rng: &mut Rng,
    kind: Kind,
    length: Duration,
    stop: &CancellationToken,
) {
    let ids = world.cluster.ids();
    let node = *rng.pick(&ids);
    match kind {
        Kind::Partition => partition(world, rng, length, stop),
        Kind::OneWay => one_way(world, rng, node, length, stop),
        Kind::Weather => weather(world, rng, length, stop),
        Kind::Crash => crash(world, rng, node, length, stop),
        Kind::DiskLoss => lose_disk(world, node, length, stop),
        Kind::IsolatePrimary => isolate_primary(world, rng, length, stop),
        Kind::Freeze => {
            world.trace.event(format!("fault: n{node} frozen for {} ms", length.as_millis()));
            world.stats().freezes += 1;
            world.cluster.net.freeze(node, tokio::time::Instant::now() + length);
        }
        Kind::DiskFull => disk_fault(world, rng, node, true, length, stop),
        Kind::SlowDisk => disk_fault(world, rng, node, false, length, stop),
        Kind::ClockJump => clock_jump(world, rng, node),
    }
}

/// Cuts a random half of the endpoints from the rest, both ways, for `length`.
fn partition(world: &Arc<World>, rng: &mut Rng, length: Duration, stop: &CancellationToken) {
    let all = endpoints(world);
    let side: Vec<bool> = all.iter().map(|_| rng.chance(500)).collect();
    let links: Vec<(Endpoint, Endpoint)> = all
        .iter()
        .zip(&side)
        .flat_map(|(a, sa)| {
            all.iter().zip(&side).filter(move |(_, sb)| *sb != sa).map(move |(b, _)| (*a, *b))
        })
        .filter(|(a, b)| matches!(a, Endpoint::Node(_)) || matches!(b, Endpoint::Node(_)))
        .collect();
    let names: Vec<String> =
        all.iter().zip(&side).filter(|(_, s)| **s).map(|(e, _)| e.to_string()).collect();
    world.trace.event(format!(
        "fault: partition {{{}}} from the rest for {} ms",
        names.join(","),
        length.as_millis()
    ));
    world.stats().partitions += 1;
    cut(world, links, length, stop);
}

/// Cuts one link between node `node` and a random endpoint, one way, for `length`.
fn one_way(
    world: &Arc<World>,
    rng: &mut Rng,
    node: u64,
    length: Duration,
    stop: &CancellationToken,
) {
    let all = endpoints(world);
    let (a, b) = (*rng.pick(&all), Endpoint::Node(node));
    let (from, to) = if rng.chance(500) { (a, b) } else { (b, a) };
    if from == to {
        return;
    }
    world
        .trace
        .event(format!("fault: link {from} -> {to} cut one way for {} ms", length.as_millis()));
    world.stats().partitions += 1;
    cut(world, vec![(from, to)], length, stop);
}

/// Loss, duplicates and latency spikes on every link for `length`.
fn weather(world: &Arc<World>, rng: &mut Rng, length: Duration, stop: &CancellationToken) {
    let weather = Weather {
        loss_permille: rng.range(0, 200),
        duplicate_permille: rng.range(0, 100),
        spike_permille: rng.range(0, 150),
    };
    world.trace.event(format!("fault: network weather {weather:?} for {} ms", length.as_millis()));
    world.cluster.net.set_weather(weather);
    let net = world.cluster.net.clone();
    later(length, stop, move || net.set_weather(Weather::default()));
}

/// Node `node`'s disk full (`full`) or slow, for `length`.
fn disk_fault(
    world: &Arc<World>,
    rng: &mut Rng,
    node: u64,
    full: bool,
    length: Duration,
    stop: &CancellationToken,
) {
    let Some(disk) = world.cluster.disk(node) else { return };
    let mut faults = disk.faults();
    if full {
        faults.full = true;
    } else {
        faults.slow_ms = rng.range(SLOW_DISK_MS.0, SLOW_DISK_MS.1);
    }
    world.trace.event(format!("fault: n{node} disk {faults:?} for {} ms", length.as_millis()));
    disk.set_faults(faults);
    world.stats().disk_faults += 1;
    later(length, stop, move || disk.set_faults(DiskFaults::default()));
}

/// Node `node`'s calendar clock jumps ahead or back, or its monotonic clock jumps (a pause).
fn clock_jump(world: &Arc<World>, rng: &mut Rng, node: u64) {
    let Some(clocks) = world.cluster.clocks(node) else { return };
    match rng.below(3) {
        0 => {
            let ms = rng.range(1, WALL_JUMP_AHEAD_MS) as i64;
            world.trace.event(format!("fault: n{node} calendar clock jumps {ms} ms ahead"));
            clocks.jump_wall(ms);
        }
        1 => {
            let ms = rng.range(1, WALL_JUMP_BACK_MS) as i64;
            world.trace.event(format!("fault: n{node} calendar clock jumps {ms} ms back"));
            clocks.jump_wall(-ms);
        }
        _ => {
            let ms = rng.range(MONO_JUMP_MS.0, MONO_JUMP_MS.1);
            world.trace.event(format!("fault: n{node} paused: its monotonic clock jumps {ms} ms"));
            clocks.jump_mono(ms);
        }
    }
}

fn cut(
    world: &Arc<World>,
    links: Vec<(Endpoint, Endpoint)>,
    length: Duration,
    stop: &CancellationToken,
) {
    let net = world.cluster.net.clone();
    for (a, b) in &links {
        net.set_cut(*a, *b, true);
    }
    later(length, stop, move || {
        for (a, b) in links {
            net.set_cut(a, b, false);
        }
    });
}

fn crash(world: &Arc<World>, rng: &mut Rng, node: u64, length: Duration, stop: &CancellationToken) {
    let down = world.cluster.ids().into_iter().filter(|id| !world.cluster.is_up(*id)).count();
    if down >= CRASHED_MAX || !world.cluster.is_up(node) {
        return;
    }
    // Most crashes lose power (unsynced data may go); some only kill the process.
    world.cluster.crash(node, rng.chance(700));
    world.stats().crashes += 1;
    // Some restarts come at once, before anyone noticed; some after a long while.
    let length = if rng.chance(200) { Duration::from_millis(rng.range(0, 200)) } else { length };
    restart_after(world, node, length, stop);
}

/// Starts machine `node`'s process again after `length` (a violation at its start is reported).
fn restart_after(world: &Arc<World>, node: u64, length: Duration, stop: &CancellationToken) {
    let cluster = world.cluster.clone();
    let monitor = world.monitor.clone();
    later(length, stop, move || {
        tokio::spawn(async move {
            if let Err(v) = cluster.start(node).await {
                monitor.report(v);
            }
        });
    });
}

/// Cuts a tenant's primary, with one gateway, off from every other node and gateway: its
/// clients there keep reaching it while the rest of the cluster marks it down and serves the
/// tenant from another node. A deposed primary that answered reads without its lease would
/// answer them stale.
fn isolate_primary(world: &Arc<World>, rng: &mut Rng, length: Duration, stop: &CancellationToken) {
    let Some(state) = world.registry_state() else { return };
    let tenants: Vec<String> = state.tenants().map(|t| t.id.to_string()).collect();
    if tenants.is_empty() || world.gateways.is_empty() {
        return;
    }
    let tenant = rng.pick(&tenants).clone();
    let Some(primary) = state.primary_of(&tenant) else { return };
    let gateway = Endpoint::Gateway(rng.below(world.gateways.len() as u64));
    let inside = [Endpoint::Node(primary), gateway];
    let links: Vec<(Endpoint, Endpoint)> = endpoints(world)
        .into_iter()
        .filter(|e| !inside.contains(e))
        .flat_map(|out| inside.iter().flat_map(move |&i| [(i, out), (out, i)]))
        .filter(|(a, b)| matches!(a, Endpoint::Node(_)) || matches!(b, Endpoint::Node(_)))
        .collect();
    world.trace.event(format!(
        "fault: {tenant}'s primary n{primary} cut off with {gateway} for {} ms",
        length.as_millis()
    ));
    world.stats().partitions += 1;
    cut(world, links, length, stop);
}

/// How a tenant's primary is moved to another live node at once.
#[derive(Debug, Clone, Copy)]
enum Move {
    /// The head of its replica set, marked down and its process down, is started, and the old
    /// primary cut off a little later; once marked up, the head takes the tenant back.
    Return(u64),
    /// The primary is drained (more than R active nodes, no placement change pending).
    Drain,
}

impl Move {
    /// How `tenant`'s `primary` can be moved, if it can: it is not the registry's leader (a
    /// leader that hears no follower goes on leading, and nothing would commit), and
    /// a second gateway is there for the clients of the new primary and the operator.
    fn of(
        world: &World,
        state: &raft_registry::RegistryState,
        tenant: &str,
        primary: u64,
    ) -> Option<Move> {
        let leads = world.cluster.parts(primary).is_some_and(|p| p.registry.status().is_leader);
        if leads || world.gateways.len() < 2 {
            return None;
        }
        let head = state.replica_set(tenant).first().copied()?;
        let entering = state.replica_change(tenant).map(|h| h.to);
        let down = state.is_down(head) && !world.cluster.is_up(head);
        if head != primary && down && Some(head) != entering {
            return Some(Move::Return(head));
        }
        let active = state.active_nodes();
        let drainable = active.len() >= 3
            && active.len() > state.replicas()
            && active.contains(&primary)
            && state.handoffs().next().is_none();
        drainable.then_some(Move::Drain)
    }
}

/// Node `primary` hears no other node (what it sends arrives; nothing sent to it, answers
/// included, does), its gateway `g` reaches no other node, and `tenant`'s primary is moved to
/// another live node at once (`how`; a returning head is started `after` before the cut).
///
/// The old primary hears no registry entry and no prepare: it still takes itself for the
/// primary, and its lease, won before at the old placement epoch, runs for up to `LEASE_MS`
/// more, while the clients of `g` reach it. The new primary must not serve before the old one
/// has promised its ballot: one that served on a majority's promises alone would leave the old
/// one answering reads that miss its writes ([`crate::monitor::Invariant::Deposed`]). As built,
/// the tenant answers 503 until the old primary promises (the cut ends) or is marked down.
async fn cut_off_and_move(
    world: &Arc<World>,
    tenant: &str,
    primary: u64,
    how: Move,
    (g, length, after): (u64, Duration, Duration),
    stop: &CancellationToken,
) {
    let node = Endpoint::Node(primary);
    let gateway = Endpoint::Gateway(g);
    let links: Vec<(Endpoint, Endpoint)> = world
        .cluster
        .ids()
        .into_iter()
        .filter(|&id| id != primary)
        .map(Endpoint::Node)
        .flat_map(|other| [(other, node), (gateway, other), (other, gateway)])
        .collect();
    if let Move::Return(head) = how {
        // The head is marked up within about half a second of its start: the old primary is cut
        // off before that, with some of its last lease still to run.
        let cluster = world.cluster.clone();
        let monitor = world.monitor.clone();
        tokio::spawn(async move {
            if let Err(v) = cluster.start(head).await {
                monitor.report(v);
            }
        });
        tokio::time::sleep(after).await;
    }
    world.trace.event(format!(
        "fault: {tenant}'s primary {node} hears no node, {gateway} reaches only it, for {} ms; \
         the tenant moves: {}",
        length.as_millis(),
        match how {
            Move::Return(head) =>
                format!("n{head} returns, started {} ms before", after.as_millis()),
            Move::Drain => format!("{node} is drained"),
        }
    ));
    world.stats().partitions += 1;
    cut(world, links, length, stop);
    if let Move::Drain = how {
        let other_gateway = (g as usize + 1) % world.gateways.len();
        let world = world.clone();
        tokio::spawn(async move {
            let drain = proto::cluster::AdminOp::DrainNode { id: primary };
            let _ = crate::operator::admin(&world, other_gateway, drain).await;
        });
    }
}

/// Machine `node` loses power and its tenant store with it (a dead disk, replaced empty); it
/// comes back after `length` with its registry intact. Once per run: a second loss before the
/// first node's copies are rebuilt may lose acknowledged writes with any number of copies.
fn lose_disk(world: &Arc<World>, node: u64, length: Duration, stop: &CancellationToken) {
    let down = world.cluster.ids().into_iter().filter(|id| !world.cluster.is_up(*id)).count();
    if world.stats().disk_losses > 0 || down >= CRASHED_MAX || !world.cluster.is_up(node) {
        return;
    }
    let Some(disk) = world.cluster.disk(node) else { return };
    world.cluster.crash(node, true);
    let store = std::path::Path::new(crate::cluster::DATA_DIR).join("store");
    if let Err(e) = disk.lose(&store) {
        world.trace.event(format!("fault: n{node} store could not be wiped: {e}"));
        return;
    }
    world
        .trace
        .event(format!("fault: n{node} loses its disk; back empty in {} ms", length.as_millis()));
    world.stats().disk_losses += 1;
    restart_after(world, node, length, stop);
}

/// Ends every fault: links mended, weather calm, disks well, crashed processes restarted.
/// Clocks keep the jumps they made, as real machines do.
pub async fn heal(world: &Arc<World>) {
    world.trace.event("heal: every fault ends");
    world.cluster.net.heal();
    for id in world.cluster.ids() {
        if let Some(disk) = world.cluster.disk(id) {
            disk.set_faults(DiskFaults::default());
        }
        if !world.cluster.is_up(id) {
            if let Err(v) = world.cluster.start(id).await {
                world.monitor.report(v);
            }
        }
    }
}
