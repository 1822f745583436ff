use super::*;
use crate::state::key_hash;

#[path = "command_replica_tests.rs"]
mod replicas;

fn new_tenant(id: &str, key: &str) -> Command {
    Command::AddTenant(TenantRecord::new(
        id.to_string(),
        Tier::Free,
        key_hash(key),
        1_700_000_000_000,
    ))
}

/// Applies each command and checks its expected outcome; a rejected command must change nothing.
fn check(state: &mut RegistryState, steps: Vec<(Command, Result<(), Rejection>)>) {
    for (i, (cmd, want)) in steps.into_iter().enumerate() {
        let before = state.clone();
        let got = apply(state, cmd.clone());
        assert_eq!(got, want, "step {i}: {cmd:?}");
        if got.is_err() {
            assert_eq!(*state, before, "step {i}: rejected command changed the state");
        }
    }
}

#[test]
fn add_tenant_and_duplicates() {
    // Goal: a tenant is added with tier defaults and found by key hash; duplicates, bad ids, a
    // key hash already in use, a clear-text key, no/duplicate hashes and an over-long e-mail are
    // rejected without change.
    let mut s = RegistryState::default();
    check(
        &mut s,
        vec![
            (new_tenant("acme", "k1"), Ok(())),
            (new_tenant("acme", "k2"), Err(Rejection::TenantExists)),
            (new_tenant("other", "k1"), Err(Rejection::KeyHashInUse)),
            (new_tenant("Bad_Id", "k3"), Err(Rejection::InvalidTenantId)),
            (new_tenant("-lead", "k3"), Err(Rejection::InvalidTenantId)),
            (new_tenant(&"a".repeat(64), "k3"), Err(Rejection::InvalidTenantId)),
        ],
    );
    let t = s.tenant_by_key_hash(&key_hash("k1")).expect("indexed by key hash");
    assert_eq!(t.id, "acme");
    assert_eq!(t.quota_bytes, 25 * 1024 * 1024);
    assert_eq!(t.daily_limit, 1_000);
    assert_eq!(t.created_at_ms, 1_700_000_000_000);
    assert!(t.enabled && !t.archived);
    assert_eq!(s.tenant_count(), 1);

    let raw_key = TenantRecord::new("raw".into(), Tier::Free, "pmb-v1-0011".into(), 0);
    let mut no_key = TenantRecord::new("nokey".into(), Tier::Free, key_hash("n"), 0);
    no_key.key_hashes.clear();
    let mut twice = TenantRecord::new("twice".into(), Tier::Free, key_hash("t"), 0);
    twice.key_hashes.push(key_hash("t"));
    let mut long_email = TenantRecord::new("mail".into(), Tier::Free, key_hash("m"), 0);
    long_email.admin_email = Some("a".repeat(300));
    check(
        &mut s,
        vec![
            (Command::AddTenant(no_key), Err(Rejection::InvalidKeyHash)),
            (Command::AddTenant(twice), Err(Rejection::InvalidKeyHash)),
            (Command::AddTenant(long_email), Err(Rejection::InvalidEmail)),
            (Command::AddTenant(raw_key), Err(Rejection::InvalidKeyHash)),
        ],
    );
}

#[test]
fn rotate_key_replaces_all_hashes() {
    // Goal: after RotateKey the old key no longer maps to the tenant, the new one does, and the
    // tenant holds exactly one hash.
    let mut s = RegistryState::default();
    check(
        &mut s,
        vec![
            (new_tenant("acme", "old"), Ok(())),
            (Command::RotateKey { id: "acme".into(), new_hash: key_hash("new") }, Ok(())),
            (
                Command::RotateKey { id: "nope".into(), new_hash: key_hash("x") },
                Err(Rejection::NoSuchTenant),
            ),
            (
                Command::RotateKey { id: "acme".into(), new_hash: "short".into() },
                Err(Rejection::InvalidKeyHash),
            ),
        ],
    );
    assert!(s.tenant_by_key_hash(&key_hash("old")).is_none(), "old key must stop working");
    assert_eq!(s.tenant_by_key_hash(&key_hash("new")).map(|t| t.id.as_str()), Some("acme"));
    assert_eq!(s.tenant("acme").map(|t| t.key_hashes.len()), Some(1));
}

#[test]
fn update_disable_archive() {
    // Goal: tier change resets limits unless overridden; disable and archive flip flags; an
    // archived tenant cannot be re-enabled or rotated.
    let mut s = RegistryState::default();
    let update = |tier, quota_bytes, enabled| Command::UpdateTenant {
        id: "acme".into(),
        tier,
        quota_bytes,
        daily_limit: None,
        enabled,
    };
    check(
        &mut s,
        vec![(new_tenant("acme", "k"), Ok(())), (update(Some(Tier::Pro), None, None), Ok(()))],
    );
    assert_eq!(s.tenant("acme").map(|t| (t.quota_bytes, t.daily_limit)), Some((250 * MIB, 10_000)));
    check(&mut s, vec![(update(Some(Tier::Team), Some(7), None), Ok(()))]);
    assert_eq!(s.tenant("acme").map(|t| (t.quota_bytes, t.daily_limit)), Some((7, 100_000)));
    check(
        &mut s,
        vec![
            (Command::DisableTenant { id: "acme".into() }, Ok(())),
            (update(None, None, Some(true)), Ok(())),
            (Command::ArchiveTenant { id: "acme".into() }, Ok(())),
            (update(None, None, Some(true)), Err(Rejection::TenantArchived)),
            (
                Command::RotateKey { id: "acme".into(), new_hash: key_hash("n") },
                Err(Rejection::TenantArchived),
            ),
            (Command::DisableTenant { id: "ghost".into() }, Err(Rejection::NoSuchTenant)),
        ],
    );
    let t = s.tenant("acme").expect("archived tenants stay recorded");
    assert!(!t.enabled && t.archived);
}

use crate::state::MIB;

fn join(id: u64) -> Command {
    Command::NodeJoin { id, addr: format!("127.0.0.1:{}", 7000 + id) }
}

/// Two nodes joined and activated.
fn two_active_nodes() -> RegistryState {
    let mut s = RegistryState::default();
    check(&mut s, vec![(join(1), Ok(())), (join(2), Ok(()))]);
    assert_eq!(s.placement_epoch(), 0, "joining changes no placement");
    let activate = |id| (Command::NodeActivate { id }, Ok(()));
    check(&mut s, vec![activate(1), activate(2)]);
    s
}

#[test]
fn node_activation_bumps_epoch_and_checks_transitions() {
    // Goal: each activation bumps the epoch and rebuilds the ring; re-activation, a used id, an
    // empty address and an unknown node are refused.
    let mut s = two_active_nodes();
    assert_eq!(s.placement_epoch(), 2);
    assert_eq!(s.active_nodes(), vec![1, 2]);
    assert_eq!(s.ring().node_ids(), &[1, 2]);
    let twice =
        Rejection::InvalidNodeTransition { id: 2, from: NodeState::Active, to: NodeState::Active };
    let no_addr = Command::NodeJoin { id: 3, addr: String::new() };
    check(
        &mut s,
        vec![
            (Command::NodeActivate { id: 2 }, Err(twice)),
            (join(1), Err(Rejection::NodeIdUsed(1))),
            (no_addr, Err(Rejection::InvalidNodeAddr)),
            (Command::NodeActivate { id: 9 }, Err(Rejection::NoSuchNode(9))),
        ],
    );
}

#[test]
fn node_removal_never_frees_the_id() {
    // Goal: drain bumps the epoch, removing a draining node does not, an active node cannot be
    // removed; a removed id can never join again; the last active node cannot leave.
    let mut s = two_active_nodes();
    let drain = |id| Command::NodeDrain { id };
    let remove = |id| Command::NodeRemove { id };
    check(&mut s, vec![(drain(2), Ok(())), (remove(2), Ok(()))]);
    assert_eq!(s.placement_epoch(), 3, "drain bumps, removing a draining node does not");
    check(
        &mut s,
        vec![
            (join(3), Ok(())),
            (Command::NodeActivate { id: 3 }, Ok(())),
            (remove(3), Err(Rejection::NodeOwnsTenants(3))),
            (drain(3), Ok(())),
            (remove(3), Ok(())),
        ],
    );
    assert_eq!(
        s.placement_epoch(),
        5,
        "activating and draining bump; an active node cannot be removed"
    );
    let removed_twice = Rejection::InvalidNodeTransition {
        id: 2,
        from: NodeState::Removed,
        to: NodeState::Removed,
    };
    check(
        &mut s,
        vec![
            (join(2), Err(Rejection::NodeIdUsed(2))),
            (remove(1), Err(Rejection::LastActiveNode(1))),
            (drain(1), Err(Rejection::LastActiveNode(1))),
            (remove(2), Err(removed_twice)),
        ],
    );
    assert_eq!(s.owner_of("acme"), Some(1));
    check(&mut s, vec![(new_tenant("acme", "k"), Ok(()))]);
    assert_eq!(s.owner_counts(), std::collections::BTreeMap::from([(1, 1)]));
}

#[test]
fn admin_key_hash_only_accepts_hashes() {
    // Goal: the admin key is stored only as a valid sha256 hex hash.
    let mut s = RegistryState::default();
    check(
        &mut s,
        vec![
            (
                Command::SetAdminKeyHash { hash: "plain-admin-key".into() },
                Err(Rejection::InvalidKeyHash),
            ),
            (Command::SetAdminKeyHash { hash: key_hash("admin") }, Ok(())),
        ],
    );
    assert_eq!(s.admin_key_hash(), Some(key_hash("admin").as_str()));
}

#[test]
fn placement_changes_record_handoffs_one_change_at_a_time() {
    // Goal: a join records a handoff for exactly the tenants whose owner changed; no other
    // placement change is accepted until every handoff is done; done needs the right epoch.
    let mut s = two_active_nodes();
    let tenants: Vec<Command> =
        (0..60).map(|i| new_tenant(&format!("t{i}"), &format!("k{i}"))).collect();
    check(&mut s, tenants.into_iter().map(|c| (c, Ok(()))).collect());
    let before: Vec<Option<u64>> = (0..60).map(|i| s.owner_of(&format!("t{i}"))).collect();
    check(&mut s, vec![(join(3), Ok(())), (Command::NodeActivate { id: 3 }, Ok(()))]);
    let epoch = s.placement_epoch();
    let mut moved: Vec<String> = (0..60)
        .filter(|&i| s.owner_of(&format!("t{i}")) != before[i])
        .map(|i| format!("t{i}"))
        .collect();
    moved.sort();
    assert!(!moved.is_empty(), "a third node takes some tenants");
    let pending: Vec<String> = s.handoffs().map(|h| h.tenant.clone()).collect();
    assert_eq!(pending, moved);
    for h in s.handoffs() {
        assert_eq!((h.to, h.epoch), (3, epoch));
    }
    let n = moved.len();
    check(&mut s, vec![(Command::NodeDrain { id: 2 }, Err(Rejection::HandoffsPending(n)))]);
    let done = |t: &str, epoch| Command::HandoffDone { tenant: t.to_string(), epoch };
    check(&mut s, vec![(done(&moved[0], epoch + 1), Err(Rejection::NoSuchHandoff))]);
    check(&mut s, moved.iter().map(|t| (done(t, epoch), Ok(()))).collect());
    check(&mut s, vec![(Command::NodeDrain { id: 2 }, Ok(()))]);
    assert!(s.handoffs().all(|h| h.from == 2), "draining moves only node 2's tenants");
}

#[test]
fn purge_destroys_an_archived_tenant_and_retires_its_id() {
    // Goal: only an archived tenant can be purged, moving or not; purging drops its record
    // and keys, retires the id for good, and a repeated purge succeeds without change.
    let mut s = two_active_nodes();
    let purge = |id: &str| Command::PurgeTenant { id: id.to_string() };
    let archive = |id: &str| Command::ArchiveTenant { id: id.to_string() };
    check(
        &mut s,
        vec![
            (purge("acme"), Err(Rejection::NoSuchTenant)),
            (new_tenant("acme", "k1"), Ok(())),
            (purge("acme"), Err(Rejection::TenantNotArchived)),
            (Command::DisableTenant { id: "acme".into() }, Ok(())),
            (purge("acme"), Err(Rejection::TenantNotArchived)),
            (archive("acme"), Ok(())),
            (purge("acme"), Ok(())),
        ],
    );
    assert!(s.tenant("acme").is_none() && s.is_purged("acme"));
    assert!(s.tenant_by_key_hash(&key_hash("k1")).is_none(), "the purged tenant's key is gone");
    let after = s.clone();
    check(
        &mut s,
        vec![
            (purge("acme"), Ok(())),
            (new_tenant("acme", "k2"), Err(Rejection::TenantIdPurged)),
            (archive("acme"), Err(Rejection::NoSuchTenant)),
            // The key is free again: it belongs to no tenant.
            (new_tenant("other", "k1"), Ok(())),
        ],
    );
    assert_eq!(s.purged().collect::<Vec<_>>(), vec!["acme"]);
    assert!(after.is_purged("acme") && s.tenant("other").is_some());

    // A tenant moving between nodes is purged at once: the purge cancels its handoff (whose
    // source may never come back), and the other handoffs of that epoch stay pending.
    let mut s = two_active_nodes();
    check(
        &mut s,
        (0..40).map(|i| (new_tenant(&format!("t{i}"), &format!("k{i}")), Ok(()))).collect(),
    );
    check(&mut s, (0..40).map(|i| (archive(&format!("t{i}")), Ok(()))).collect());
    check(&mut s, vec![(join(3), Ok(())), (Command::NodeActivate { id: 3 }, Ok(()))]);
    let moving = s.handoffs().next().expect("a third node takes some tenants").clone();
    let others: Vec<Handoff> =
        s.handoffs().filter(|h| h.tenant != moving.tenant).cloned().collect();
    check(&mut s, vec![(purge(&moving.tenant), Ok(()))]);
    assert!(s.handoff(&moving.tenant).is_none() && s.is_purged(&moving.tenant));
    assert_eq!(s.handoffs().cloned().collect::<Vec<_>>(), others, "only its handoff is cancelled");
    let done = Command::HandoffDone { tenant: moving.tenant.clone(), epoch: moving.epoch };
    check(&mut s, vec![(done, Err(Rejection::NoSuchHandoff))]);
}
