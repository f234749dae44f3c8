use super::*;
use crate::api::SecretKeyRef;
use proptest::prelude::*;

fn replica(name: &str, slot: Option<&str>) -> ReplicaSpec {
    ReplicaSpec {
        name: name.into(),
        connection_secret_ref: SecretKeyRef {
            name: format!("{name}-conn"),
            key: None,
        },
        slot: slot.map(String::from),
        max_lag_seconds: None,
        max_lag_bytes: None,
    }
}

fn spec(replicas: Vec<ReplicaSpec>) -> ReplicasSpec {
    ReplicasSpec {
        replicas,
        ..Default::default()
    }
}

fn slot(active: bool, retained: i64) -> Slot {
    Slot {
        slot_type: "physical".into(),
        active,
        active_pid: active.then_some(4242),
        wal_status: Some("reserved".into()),
        retained_bytes: Some(retained),
        ..Default::default()
    }
}

fn reached(replay: u64, receive: u64, age: f64) -> Probe {
    Probe {
        checked_at: Some("2026-01-01T00:00:00Z".into()),
        result: ProbeResult::Reached(ReplicaSide {
            in_recovery: true,
            receive_lsn: Some(Lsn(receive)),
            replay_lsn: Some(Lsn(replay)),
            replay_paused: Some(false),
            last_replay_age_seconds: Some(age),
            receiver_status: Some("streaming".into()),
            receiver_slot: None,
        }),
    }
}

fn primary_at(lsn: u64) -> Observed {
    Observed {
        primary_lsn: Some(Lsn(lsn)),
        ..Default::default()
    }
}

#[test]
fn lsn_parses_and_subtracts() {
    let a = Lsn::parse("16/B374D848").unwrap();
    assert_eq!(a.0, 0x16_B374_D848);
    assert_eq!(a.to_string(), "16/B374D848");
    assert_eq!(Lsn::parse("0/0"), Some(Lsn(0)));
    assert_eq!(Lsn::parse("nope"), None);
    assert_eq!(Lsn::parse("1FFFFFFFF/0"), None);
    assert_eq!(Lsn(100).bytes_since(Lsn(40)), 60);
    assert_eq!(Lsn(40).bytes_since(Lsn(100)), 0);
}

#[test]
fn creates_declared_slots_with_wal_reserved_and_records_them() {
    let p = plan(
        &spec(vec![replica("r1", Some("r1_slot")), replica("r2", None)]),
        &primary_at(0),
        &Ledger::for_policy("p"),
    );
    assert_eq!(p.changes.len(), 1);
    let c = &p.changes[0];
    assert_eq!(
        c.sql,
        "SELECT pg_create_physical_replication_slot('r1_slot', true)"
    );
    assert_eq!(c.hazard, Hazard::Safe);
    assert!(!c.transactional, "slot creation survives a rollback");
    assert_eq!(
        c.lock,
        crate::engine::plan::LockLevel::None,
        "no relation lock"
    );
    assert_eq!(c.ledger.len(), 1);
}

#[test]
fn existing_slot_is_left_alone_and_not_claimed() {
    let mut obs = primary_at(0);
    obs.slots.insert("s".into(), slot(true, 0));
    let p = plan(
        &spec(vec![replica("r", Some("s"))]),
        &obs,
        &Ledger::for_policy("p"),
    );
    assert!(p.changes.is_empty());
    assert!(p.errors.is_empty());
}

#[test]
fn only_owned_slots_are_dropped_and_only_as_destructive() {
    let mut obs = primary_at(0);
    obs.slots.insert("mine".into(), slot(false, 0));
    obs.slots.insert("theirs".into(), slot(false, 0));
    let mut ledger = Ledger::for_policy("p");
    ledger.insert(AREA, "mine", OWNED_SLOT, "p");
    let p = plan(&spec(vec![]), &obs, &ledger);
    assert_eq!(p.changes.len(), 1);
    assert_eq!(p.changes[0].sql, "SELECT pg_drop_replication_slot('mine')");
    assert_eq!(p.changes[0].hazard, Hazard::Destructive);
    assert_eq!(p.changes[0].lock, crate::engine::plan::LockLevel::None);
    assert!(matches!(
        p.changes[0].ledger[0],
        crate::engine::plan::LedgerOp::Forget { .. }
    ));
}

#[test]
fn an_owned_slot_in_use_is_not_dropped_but_said() {
    let mut obs = primary_at(0);
    obs.slots.insert("mine".into(), slot(true, 0));
    let mut ledger = Ledger::for_policy("p");
    ledger.insert(AREA, "mine", OWNED_SLOT, "p");
    let p = plan(&spec(vec![]), &obs, &ledger);
    assert!(p.changes.is_empty());
    assert_eq!(p.notices[0].reason, Reason::SlotInUse);
}

#[test]
fn bad_duplicate_and_logical_slots_are_errors() {
    let mut obs = primary_at(0);
    obs.slots.insert(
        "logi".into(),
        Slot {
            slot_type: "logical".into(),
            ..slot(false, 0)
        },
    );
    let p = plan(
        &spec(vec![
            replica("a", Some("Bad-Name")),
            replica("b", Some("dup")),
            replica("c", Some("dup")),
            replica("d", Some("logi")),
        ]),
        &obs,
        &Ledger::for_policy("p"),
    );
    let reasons: Vec<Reason> = p.errors.iter().map(|e| e.reason).collect();
    assert_eq!(
        reasons,
        [
            Reason::InvalidSlotName,
            Reason::DuplicateSlot,
            Reason::SlotTypeMismatch
        ]
    );
    // The first declaration of "dup" still gets its slot.
    assert_eq!(p.changes.len(), 1);
}

#[test]
fn quotes_slot_names_in_sql() {
    // Invalid names never reach SQL; valid ones are still literals, not spliced text.
    let c = render(&Op::CreateSlot { name: "a'b".into() });
    assert!(c.sql.contains("'a''b'"));
}

#[test]
fn inactive_slots_retaining_wal_are_reported_with_bytes() {
    let mut obs = primary_at(0);
    obs.slots
        .insert("idle".into(), slot(false, 64 * 1024 * 1024));
    obs.slots.insert("busy".into(), slot(true, 1 << 30));
    obs.slots.insert("empty".into(), slot(false, 0));
    let p = plan(&spec(vec![]), &obs, &Ledger::for_policy("p"));
    let n: Vec<_> = p
        .notices
        .iter()
        .filter(|n| n.reason == Reason::InactiveSlotRetainingWal)
        .collect();
    assert_eq!(n.len(), 1);
    assert_eq!(n[0].target, "idle");
    assert!(n[0].message.contains("67108864 bytes"), "{}", n[0].message);
    assert!(n[0].message.contains("64.0 MiB"), "{}", n[0].message);
}

#[test]
fn lost_slot_is_said() {
    let mut obs = primary_at(0);
    obs.slots.insert(
        "s".into(),
        Slot {
            wal_status: Some("lost".into()),
            ..slot(false, 0)
        },
    );
    let p = plan(
        &spec(vec![replica("r", Some("s"))]),
        &obs,
        &Ledger::for_policy("p"),
    );
    assert!(p.notices.iter().any(|n| n.reason == Reason::SlotLost));
}

#[test]
fn a_standby_as_primary_is_an_error() {
    let obs = Observed {
        primary_in_recovery: true,
        ..Default::default()
    };
    let p = plan(
        &spec(vec![replica("r", Some("s"))]),
        &obs,
        &Ledger::for_policy("p"),
    );
    assert_eq!(p.errors[0].reason, Reason::PrimaryInRecovery);
    assert!(p.changes.is_empty());
}

fn with_sender(mut obs: Observed, slot_name: &str, lag_s: Option<f64>, lag_b: i64) -> Observed {
    obs.slots.insert(slot_name.into(), slot(true, 0));
    obs.senders.push(Sender {
        pid: 4242,
        application_name: "walreceiver".into(),
        client_addr: Some("127.0.0.1".into()),
        state: Some("streaming".into()),
        replay_lsn: obs.primary_lsn.map(|l| Lsn(l.0 - lag_b as u64)),
        replay_lag_seconds: lag_s,
        replay_lag_bytes: Some(lag_b),
    });
    obs
}

#[test]
fn primary_side_lag_is_preferred_over_replay_timestamps() {
    let mut obs = with_sender(primary_at(1000), "s", Some(0.25), 10);
    // An idle primary: the replica's last replay is an hour old.
    obs.probes.insert("r".into(), reached(990, 990, 3600.0));
    let h = &health(&spec(vec![replica("r", Some("s"))]), &obs)[0];
    assert_eq!(h.state, ReplicaState::Healthy);
    assert_eq!(h.lag_seconds, Some(0.25));
    assert_eq!(h.lag_seconds_source, Some(LagSource::Primary));
    assert_eq!(h.lag_bytes, Some(10));
    assert_eq!(h.lag_bytes_source, Some(LagSource::Primary));
    assert!(h.streaming.as_deref().unwrap().contains("127.0.0.1"));
}

#[test]
fn paused_replay_is_measured_on_the_replica() {
    // The primary's replay_lag is stale while replay does not move.
    let mut obs = with_sender(primary_at(1000), "s", Some(0.001), 900);
    let mut probe = reached(100, 1000, 75.0);
    if let ProbeResult::Reached(side) = &mut probe.result {
        side.replay_paused = Some(true);
    }
    obs.probes.insert("r".into(), probe);
    let h = &health(&spec(vec![replica("r", Some("s"))]), &obs)[0];
    assert_eq!(h.lag_seconds, Some(75.0));
    assert_eq!(h.lag_seconds_source, Some(LagSource::Replica));
    assert_eq!(h.lag_bytes_source, Some(LagSource::Primary));
}

#[test]
fn caught_up_sender_without_replay_lag_is_zero() {
    let mut obs = with_sender(primary_at(1000), "s", None, 0);
    obs.probes.insert("r".into(), reached(1000, 1000, 3600.0));
    let h = &health(&spec(vec![replica("r", Some("s"))]), &obs)[0];
    assert_eq!(h.lag_seconds, Some(0.0));
}

#[test]
fn replica_side_lag_when_no_sender_matches() {
    let mut obs = primary_at(5000);
    obs.probes.insert("r".into(), reached(1000, 3000, 42.0));
    let h = &health(&spec(vec![replica("r", None)]), &obs)[0];
    assert_eq!(h.lag_seconds, Some(42.0));
    assert_eq!(h.lag_seconds_source, Some(LagSource::Replica));
    assert_eq!(h.lag_bytes, Some(4000));
    assert_eq!(h.lag_bytes_source, Some(LagSource::Replica));
    // Replayed all it received: the replay timestamp measures idleness, not lag.
    obs.probes.insert("r".into(), reached(5000, 5000, 3600.0));
    let h = &health(&spec(vec![replica("r", None)]), &obs)[0];
    assert_eq!(h.lag_seconds, Some(0.0));
    assert_eq!(h.lag_bytes, Some(0));
}

#[test]
fn sender_matched_by_application_name() {
    let mut obs = with_sender(primary_at(1000), "other", Some(1.5), 5);
    obs.senders[0].application_name = "r".into();
    obs.probes.insert("r".into(), reached(0, 0, 0.0));
    let h = &health(&spec(vec![replica("r", None)]), &obs)[0];
    assert_eq!(h.lag_seconds, Some(1.5));
    assert_eq!(h.lag_bytes_source, Some(LagSource::Primary));
}

#[test]
fn lag_limits_make_a_replica_lagging() {
    let mut r = replica("r", Some("s"));
    r.max_lag_bytes = Some(1024);
    r.max_lag_seconds = Some(30);
    let mut obs = with_sender(primary_at(1 << 20), "s", Some(2.0), 4096);
    obs.probes.insert("r".into(), reached(0, 0, 0.0));
    let s = spec(vec![r.clone()]);
    let h = &health(&s, &obs)[0];
    assert_eq!(h.state, ReplicaState::Lagging);
    assert!(h.detail.as_deref().unwrap().contains("maxLagBytes 1024"));
    let p = plan(&s, &obs, &Ledger::for_policy("p"));
    assert!(p.notices.iter().any(|n| n.reason == Reason::ReplicaLagging));

    // Within both limits.
    let mut obs = with_sender(primary_at(1 << 20), "s", Some(2.0), 512);
    obs.probes.insert("r".into(), reached(0, 0, 0.0));
    assert_eq!(health(&s, &obs)[0].state, ReplicaState::Healthy);

    // Over the time limit only.
    let mut obs = with_sender(primary_at(1 << 20), "s", Some(31.0), 0);
    obs.probes.insert("r".into(), reached(0, 0, 0.0));
    assert_eq!(health(&s, &obs)[0].state, ReplicaState::Lagging);
}

#[test]
fn unreachable_not_in_recovery_and_unchecked() {
    let mut obs = primary_at(0);
    obs.probes.insert(
        "down".into(),
        Probe {
            checked_at: Some("t".into()),
            result: ProbeResult::Unreachable {
                message: "cannot connect to h:5432/db: timed out after 2s".into(),
            },
        },
    );
    let mut promoted = reached(0, 0, 0.0);
    if let ProbeResult::Reached(side) = &mut promoted.result {
        side.in_recovery = false;
    }
    obs.probes.insert("promoted".into(), promoted);
    let s = spec(vec![
        replica("down", None),
        replica("promoted", None),
        replica("nourl", None),
    ]);
    let states: Vec<_> = health(&s, &obs).iter().map(|h| h.state).collect();
    assert_eq!(
        states,
        [
            ReplicaState::Unreachable,
            ReplicaState::NotInRecovery,
            ReplicaState::Unknown
        ]
    );
    let p = plan(&s, &obs, &Ledger::for_policy("p"));
    let reasons: Vec<_> = p.notices.iter().map(|n| n.reason).collect();
    assert_eq!(
        reasons,
        [
            Reason::ReplicaUnreachable,
            Reason::ReplicaNotInRecovery,
            Reason::ReplicaNotChecked
        ]
    );
    assert!(p.notices[0].message.contains("timed out"));
}

#[test]
fn paused_replay_is_said() {
    let mut obs = primary_at(100);
    let mut probe = reached(10, 100, 5.0);
    if let ProbeResult::Reached(side) = &mut probe.result {
        side.replay_paused = Some(true);
    }
    obs.probes.insert("r".into(), probe);
    let h = &health(&spec(vec![replica("r", None)]), &obs)[0];
    assert!(h.replay_paused);
    assert!(h.detail.as_deref().unwrap().contains("paused"));
}

#[test]
fn status_rounds_and_names_the_slot() {
    let mut obs = with_sender(primary_at(1000), "s", Some(0.123456), 0);
    obs.probes.insert("r".into(), reached(1000, 1000, 0.0));
    let s = status(&spec(vec![replica("r", Some("s"))]), &obs);
    assert_eq!(s[0].state, "Healthy");
    assert_eq!(s[0].lag_seconds, Some(0.123));
    assert_eq!(s[0].slot.as_deref(), Some("s"));
    assert_eq!(
        s[0].last_check_time.as_deref(),
        Some("2026-01-01T00:00:00Z")
    );
}

fn st(name: &str, state: ReplicaState) -> ReplicaStatus {
    ReplicaStatus {
        name: name.into(),
        state: state.as_str().into(),
        ..Default::default()
    }
}

#[test]
fn readiness_names_the_worst_state_and_every_unhealthy_replica() {
    assert_eq!(readiness(&[st("a", ReplicaState::Healthy)]), Ok(()));
    assert_eq!(readiness(&[]), Ok(()));
    let (reason, message) = readiness(&[
        st("a", ReplicaState::Lagging),
        st("b", ReplicaState::Healthy),
        st("c", ReplicaState::Unreachable),
    ])
    .unwrap_err();
    assert_eq!(reason, Reason::ReplicaUnreachable);
    assert_eq!(message, "a is Lagging, c is Unreachable");
}

#[test]
fn transitions_are_state_changes() {
    let before = [
        st("a", ReplicaState::Healthy),
        st("b", ReplicaState::Lagging),
    ];
    let after = [
        st("a", ReplicaState::Lagging),
        st("b", ReplicaState::Healthy),
        st("c", ReplicaState::Healthy),
        st("d", ReplicaState::Unreachable),
    ];
    let t = transitions(&before, &after);
    assert_eq!(t.len(), 3);
    assert_eq!(
        (t[0].name.as_str(), t[0].from.as_deref(), t[0].healthy),
        ("a", Some("Healthy"), false)
    );
    assert_eq!((t[1].name.as_str(), t[1].healthy), ("b", true));
    assert_eq!((t[2].name.as_str(), t[2].from.as_deref()), ("d", None));
    assert!(transitions(&after, &after).is_empty());
}

fn arb_slot_name() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["s1", "s2", "s3", "s4"]).prop_map(String::from)
}

proptest! {
    /// Convergence: after applying a plan (destructive changes allowed), planning
    /// again yields nothing to do, and slots not owned are never touched.
    #[test]
    fn applying_a_plan_converges(
        declared in prop::collection::vec(prop::option::of(arb_slot_name()), 0..4),
        existing in prop::collection::btree_map(arb_slot_name(), prop::bool::ANY, 0..4),
        owned in prop::collection::btree_set(arb_slot_name(), 0..4),
    ) {
        let mut seen = BTreeSet::new();
        let replicas: Vec<_> = declared
            .into_iter()
            .enumerate()
            .map(|(i, s)| replica(&format!("r{i}"), s.filter(|s| seen.insert(s.clone())).as_deref()))
            .collect();
        let s = spec(replicas);
        let mut obs = primary_at(0);
        for (name, active) in &existing {
            obs.slots.insert(name.clone(), slot(*active, 0));
        }
        let mut ledger = Ledger::for_policy("p");
        for name in &owned {
            ledger.insert(AREA, name, OWNED_SLOT, "p");
        }
        crate::engine::areas::convergence::converges::<Replicas>(&s, &obs, &ledger, |ops, _| {
            for op in ops {
                if let Op::DropSlot { name } = op {
                    prop_assert!(owned.contains(name), "dropped {name}, not owned");
                }
            }
            Ok(())
        })?;
    }
}
