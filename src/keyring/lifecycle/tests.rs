use super::*;

fn v(n: u32) -> KeyVersion {
    KeyVersion::new(n).unwrap()
}

fn t(secs: u64) -> Timestamp {
    Timestamp::from_unix(secs)
}

const DAY: u64 = 24 * 3600;

fn fresh() -> KeyringFile {
    KeyringFile::generate(t(1_000)).unwrap()
}

fn states(f: &KeyringFile) -> Vec<(u32, KeyState)> {
    f.versions
        .iter()
        .map(|s| (s.info.version.get(), s.info.state))
        .collect()
}

fn changed(o: Outcome) -> Vec<Transition> {
    match o {
        Outcome::Changed(c) => c,
        Outcome::Unchanged(why) => panic!("expected a change, got: {why}"),
    }
}

fn unchanged(o: Outcome) -> String {
    match o {
        Outcome::Unchanged(why) => why,
        Outcome::Changed(c) => panic!("expected no change, got {c:?}"),
    }
}

#[test]
fn staged_rotation_walks_every_state() {
    use KeyState::*;
    let mut f = fresh();
    let c = changed(f.rotate(t(2_000), false, None).unwrap());
    assert_eq!(
        c,
        [Transition {
            version: v(2),
            from: None,
            to: Pending
        }]
    );
    assert_eq!(states(&f), [(1, Primary), (2, Pending)]);
    assert_ne!(
        f.versions[0].kek.as_ref().unwrap().fingerprint(),
        f.versions[1].kek.as_ref().unwrap().fingerprint()
    );

    let c = changed(f.promote(v(2), t(3_000)).unwrap());
    assert_eq!(
        c,
        [
            Transition {
                version: v(1),
                from: Some(Primary),
                to: DecryptOnly
            },
            Transition {
                version: v(2),
                from: Some(Pending),
                to: Primary
            },
        ]
    );
    assert_eq!(f.versions[1].info.promoted, Some(t(3_000)));

    changed(
        f.retire(
            v(1),
            t(4_000),
            None,
            DEFAULT_RETIRE_WINDOW,
            RetireBasis::Scan,
        )
        .unwrap(),
    );
    assert_eq!(states(&f), [(1, Retired), (2, Primary)]);
    assert_eq!(f.versions[0].info.retired, Some(t(4_000)));

    changed(f.restore(v(1)).unwrap());
    assert_eq!(states(&f), [(1, DecryptOnly), (2, Primary)]);
    assert_eq!(f.versions[0].info.retired, None);

    changed(
        f.retire(
            v(1),
            t(5_000),
            None,
            DEFAULT_RETIRE_WINDOW,
            RetireBasis::Scan,
        )
        .unwrap(),
    );
    changed(f.destroy(v(1), t(6_000)).unwrap());
    assert_eq!(states(&f), [(1, Destroyed), (2, Primary)]);
    assert!(f.versions[0].kek.is_none());
    assert_eq!(f.versions[0].info.destroyed, Some(t(6_000)));

    // The destroyed number is never reused.
    changed(f.rotate(t(7_000), true, None).unwrap());
    assert_eq!(states(&f), [(1, Destroyed), (2, DecryptOnly), (3, Primary)]);
    // The file still round-trips.
    let back = KeyringFile::parse(f.encode().as_bytes()).unwrap();
    assert_eq!(back.infos(), f.infos());
}

#[test]
fn every_command_is_idempotent() {
    let mut f = fresh();
    changed(f.rotate(t(2), false, None).unwrap());
    assert_eq!(
        unchanged(f.rotate(t(3), false, None).unwrap()),
        "version 2 is already pending; roll it out and run `kekd admin promote 2` (or retire it) before rotating again"
    );
    changed(f.promote(v(2), t(4)).unwrap());
    assert_eq!(
        unchanged(f.promote(v(2), t(5)).unwrap()),
        "version 2 is already primary"
    );
    changed(
        f.retire(v(1), t(6), None, DEFAULT_RETIRE_WINDOW, RetireBasis::Scan)
            .unwrap(),
    );
    assert_eq!(
        unchanged(
            f.retire(v(1), t(7), None, DEFAULT_RETIRE_WINDOW, RetireBasis::Usage)
                .unwrap()
        ),
        "version 1 is already retired"
    );
    changed(f.destroy(v(1), t(8)).unwrap());
    assert_eq!(
        unchanged(f.destroy(v(1), t(9)).unwrap()),
        "version 1 is already destroyed"
    );
    assert_eq!(
        unchanged(f.restore(v(2)).unwrap()),
        "version 2 is primary, not retired: nothing to restore"
    );
}

#[test]
fn rotate_promote_uses_a_pending_version_and_expect_primary_guards_reruns() {
    let mut f = fresh();
    changed(f.rotate(t(2), false, None).unwrap());
    let c = changed(f.rotate(t(3), true, None).unwrap());
    assert_eq!(
        c.last(),
        Some(&Transition {
            version: v(2),
            from: Some(KeyState::Pending),
            to: KeyState::Primary
        })
    );
    assert_eq!(f.versions.len(), 2, "no new key generated");

    let mut f = fresh();
    changed(f.rotate(t(2), true, Some(v(1))).unwrap());
    assert_eq!(
        unchanged(f.rotate(t(3), true, Some(v(1))).unwrap()),
        "already rotated: version 2 replaced version 1 as primary"
    );
    assert_eq!(f.versions.len(), 2);
    assert_eq!(
        f.rotate(t(3), false, Some(v(7))).unwrap_err(),
        OpError::UnexpectedPrimary {
            expected: v(7),
            actual: v(2)
        }
    );
}

#[test]
fn guards_refuse_with_the_fix() {
    let mut f = fresh();
    let err = f
        .retire(v(1), t(2), None, DEFAULT_RETIRE_WINDOW, RetireBasis::Force)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "version 1 is primary: the primary cannot be retired; rotate to a new primary first (`kekd admin rotate --promote`)"
    );
    let err = f.destroy(v(1), t(2)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "version 1 is primary: only a retired version can be destroyed; retire it first and make sure nothing needs it"
    );
    assert_eq!(
        f.promote(v(9), t(2)).unwrap_err().to_string(),
        "version 9 is not in this keyring (see `kekd admin list`)"
    );
    changed(f.rotate(t(2), true, None).unwrap());
    // A former primary never becomes primary again (A -> B -> A).
    let err = f.promote(v(1), t(3)).unwrap_err();
    assert!(
        matches!(
            err,
            OpError::WrongState {
                state: KeyState::DecryptOnly,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("would reuse its key id"), "{err}");
    // Destroy needs retire first; restore cannot bring back destroyed material.
    changed(
        f.retire(v(1), t(4), None, DEFAULT_RETIRE_WINDOW, RetireBasis::Scan)
            .unwrap(),
    );
    changed(f.destroy(v(1), t(5)).unwrap());
    let err = f.restore(v(1)).unwrap_err();
    assert!(err.to_string().contains("cannot be restored"), "{err}");
    let err = f.promote(v(1), t(6)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "version 1 is destroyed: its key material is gone"
    );
}

#[test]
fn retire_refuses_recently_used_versions_unless_scanned_or_forced() {
    // Version 2 is pending here but decrypted: another node promoted it.
    let mut f = fresh();
    changed(f.rotate(t(2), false, None).unwrap());
    let now = t(100 * DAY);
    let recent = Some(t(100 * DAY - 3600));
    let err = f
        .retire(v(2), now, recent, DEFAULT_RETIRE_WINDOW, RetireBasis::Usage)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "version 2 served a Decrypt at 1970-04-10T23:00:00Z, within the last 24h; apiservers may still need it \
         (wait until 24h after it, or retire it with a fresh scan showing nothing stored under it (--scan), or \
         pass --force)"
    );
    assert_eq!(
        states(&f)[1].1,
        KeyState::Pending,
        "refusal changed nothing"
    );
    // Just outside the window, with a scan, and with --force, it goes through.
    let old = Some(t(100 * DAY - DAY));
    for (last, basis) in [
        (old, RetireBasis::Usage),
        (recent, RetireBasis::Scan),
        (recent, RetireBasis::Force),
    ] {
        changed(
            f.retire(v(2), now, last, DEFAULT_RETIRE_WINDOW, basis)
                .unwrap(),
        );
        changed(f.restore(v(2)).unwrap());
    }
}

#[test]
fn a_version_that_was_primary_retires_only_on_a_scan_or_by_force() {
    let mut f = fresh();
    changed(f.rotate(t(2), true, None).unwrap());
    changed(f.rotate(t(3), false, None).unwrap());
    let now = t(100 * DAY);
    // No Decrypt ever, long ago: still refused, since the apiserver caches
    // the seeds it made and never decrypts them until it restarts.
    let err = f
        .retire(v(1), now, None, DEFAULT_RETIRE_WINDOW, RetireBasis::Usage)
        .unwrap_err();
    assert_eq!(
        err,
        OpError::NeedsScan {
            version: v(1),
            promoted: t(1_000)
        }
    );
    assert_eq!(
        err.to_string(),
        "version 1 was primary (since 1970-01-01T00:16:40Z), so objects may be stored under it although it \
         served no Decrypt: an apiserver caches the seeds it made itself and only decrypts them after a restart, \
         so Decrypt counts prove nothing for this version. Retire it only with a fresh scan that shows nothing \
         stored under it (--scan), or pass --force to retire it anyway (objects stored under version 1 become \
         unreadable until `kekd admin restore 1`)"
    );
    assert_eq!(
        states(&f)[0].1,
        KeyState::DecryptOnly,
        "refusal changed nothing"
    );
    // A version never promoted goes by its usage, as before.
    changed(
        f.retire(v(3), now, None, DEFAULT_RETIRE_WINDOW, RetireBasis::Usage)
            .unwrap(),
    );
    // The scan (checked by the caller) or the override retire it.
    changed(
        f.retire(v(1), now, None, DEFAULT_RETIRE_WINDOW, RetireBasis::Scan)
            .unwrap(),
    );
    changed(f.restore(v(1)).unwrap());
    changed(
        f.retire(v(1), now, None, DEFAULT_RETIRE_WINDOW, RetireBasis::Force)
            .unwrap(),
    );
    assert_eq!(
        retire_risk(v(1)),
        "retired without a scan: objects stored under version 1 become unreadable (at the latest when an \
         apiserver restarts) until `kekd admin restore 1`"
    );
}

#[test]
fn restore_returns_never_promoted_versions_to_pending() {
    let mut f = fresh();
    changed(f.rotate(t(2), false, None).unwrap());
    changed(
        f.retire(v(2), t(3), None, DEFAULT_RETIRE_WINDOW, RetireBasis::Usage)
            .unwrap(),
    );
    let c = changed(f.restore(v(2)).unwrap());
    assert_eq!(
        c,
        [Transition {
            version: v(2),
            from: Some(KeyState::Retired),
            to: KeyState::Pending
        }]
    );
}

#[test]
fn successor_rules() {
    let mut f = fresh();
    changed(f.rotate(t(2), false, None).unwrap());
    let old = f.views();
    let id = f.id;
    // Promotion, retirement and destruction are all legal successors.
    let mut g = KeyringFile::parse(f.encode().as_bytes()).unwrap();
    changed(g.promote(v(2), t(3)).unwrap());
    changed(
        g.retire(v(1), t(4), None, DEFAULT_RETIRE_WINDOW, RetireBasis::Scan)
            .unwrap(),
    );
    changed(g.destroy(v(1), t(5)).unwrap());
    check_successor(&id, &old, &id, &g.views()).unwrap();

    // The reverse of a promotion is not.
    let mut h = KeyringFile::parse(f.encode().as_bytes()).unwrap();
    changed(h.promote(v(2), t(3)).unwrap());
    assert_eq!(
        check_successor(&id, &h.views(), &id, &old),
        Err(SuccessorError::PrimaryBackwards {
            old: v(2),
            new: v(1)
        })
    );
    // Destroyed material cannot come back.
    assert_eq!(
        check_successor(&id, &g.views(), &id, &old),
        Err(SuccessorError::Resurrected(v(1)))
    );
    // A lost version (an older copy).
    let mut older = KeyringFile::parse(f.encode().as_bytes()).unwrap();
    older.versions.pop();
    assert_eq!(
        check_successor(&id, &old, &id, &older.views()),
        Err(SuccessorError::Missing(v(2)))
    );
    // Changed material under the same version.
    let mut forged = KeyringFile::parse(f.encode().as_bytes()).unwrap();
    forged.versions[1].kek = Some(Kek::generate().unwrap());
    assert_eq!(
        check_successor(&id, &old, &id, &forged.views()),
        Err(SuccessorError::MaterialChanged(v(2)))
    );
    // Another keyring.
    let other = fresh();
    assert!(matches!(
        check_successor(&id, &old, &other.id, &other.views()),
        Err(SuccessorError::OtherKeyring { .. })
    ));
}

#[test]
fn retire_refuses_a_last_decrypt_later_than_the_clock_and_trusts_the_boot_clock() {
    let mut f = fresh();
    changed(f.rotate(t(2), false, None).unwrap());
    // The clock was set back 400 days after the server recorded a Decrypt.
    let now = t(1_000 * DAY);
    let future = Some(t(1_400 * DAY));
    let err = f
        .retire(v(2), now, future, DEFAULT_RETIRE_WINDOW, RetireBasis::Usage)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "version 2 served a Decrypt at 1973-11-01T00:00:00Z, later than this host's clock says it is now \
         (1972-09-27T00:00:00Z): the clock has jumped back or differs from the server's; fix the clock \
         (`timedatectl`) and run this again, or retire it with a fresh scan showing nothing stored under it \
         (--scan), or pass --force"
    );
    assert_eq!(
        states(&f)[1].1,
        KeyState::Pending,
        "refusal changed nothing"
    );

    // The clock jumped 400 days forward: the wall clock says idle, the boot
    // clock says 5 s ago.
    let last = Some(t(600 * DAY));
    let err = KeyringFile::check_retire_by_boot_clock(
        v(2),
        Some(Duration::from_millis(5_900)),
        last,
        DEFAULT_RETIRE_WINDOW,
        RetireBasis::Usage,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "version 2 served a Decrypt 5s ago by the system's boot clock, within the last 24h, although the wall \
         clock puts it at 1971-08-24T00:00:00Z: the wall clock has jumped; apiservers may still need it (wait \
         until 24h after it, or retire it with a fresh scan showing nothing stored under it (--scan), or pass \
         --force)"
    );
    // Outside the window, unknown (another boot), scanned or forced: no
    // objection.
    for (since, basis) in [
        (Some(Duration::from_secs(DAY)), RetireBasis::Usage),
        (None, RetireBasis::Usage),
        (Some(Duration::from_secs(5)), RetireBasis::Scan),
        (Some(Duration::from_secs(5)), RetireBasis::Force),
    ] {
        KeyringFile::check_retire_by_boot_clock(v(2), since, last, DEFAULT_RETIRE_WINDOW, basis)
            .unwrap();
    }
    // --force also passes the future check.
    changed(
        f.retire(v(2), now, future, DEFAULT_RETIRE_WINDOW, RetireBasis::Force)
            .unwrap(),
    );
}
