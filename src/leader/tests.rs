use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::LeaseSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;

use super::*;

const S: fn(u64) -> Duration = Duration::from_secs;

fn held_by(holder: &str, renewed_at: i64) -> Record {
    Record {
        holder: Some(holder.into()),
        lease_duration: S(15),
        acquire_time: Some(Timestamp::from_second(1_000).unwrap()),
        renew_time: Some(Timestamp::from_second(renewed_at).unwrap()),
        transitions: 3,
    }
}

#[test]
fn a_missing_or_free_lease_is_taken_at_once() {
    let t0 = Instant::now();
    let mut e = Elector::new("me");
    assert_eq!(e.observe(None, t0), Decision::Acquire);
    let released = Record {
        holder: None,
        ..held_by("other", 1_000)
    };
    assert_eq!(e.observe(Some(&released), t0), Decision::Acquire);
    let empty = Record {
        holder: Some(String::new()),
        ..held_by("other", 1_000)
    };
    // An empty holder string reads as None when parsed from a Lease.
    let lease = Lease {
        spec: Some(LeaseSpec {
            holder_identity: empty.holder.clone(),
            ..LeaseSpec::default()
        }),
        ..Lease::default()
    };
    assert_eq!(Record::from_lease(&lease, S(15)).holder, None);
}

#[test]
fn a_live_lease_is_left_alone_until_it_has_not_changed_for_its_duration() {
    let t0 = Instant::now();
    let mut e = Elector::new("me");
    let r = held_by("other", 1_000);
    assert_eq!(
        e.observe(Some(&r), t0),
        Decision::Standby {
            holder: "other".into(),
            expires_in: S(15)
        }
    );
    // The same record 14 s later: still standing by, 1 s left.
    assert_eq!(
        e.observe(Some(&r), t0 + S(14)),
        Decision::Standby {
            holder: "other".into(),
            expires_in: S(1)
        }
    );
    // Unchanged for the full duration, by our clock: take it.
    assert_eq!(e.observe(Some(&r), t0 + S(15)), Decision::Acquire);
}

#[test]
fn every_renewal_restarts_the_standbys_clock() {
    let t0 = Instant::now();
    let mut e = Elector::new("me");
    let mut at = t0;
    for renewal in 0..20 {
        let r = held_by("other", 1_000 + renewal * 2);
        assert!(matches!(e.observe(Some(&r), at), Decision::Standby { .. }));
        at += S(2);
    }
    // The leader died after the last renewal, seen at `at - 2 s`: the standby waits the
    // full duration from that sighting, not from the record's own timestamp.
    let last = held_by("other", 1_000 + 19 * 2);
    assert!(matches!(
        e.observe(Some(&last), at - S(2) + S(14)),
        Decision::Standby { .. }
    ));
    assert_eq!(e.observe(Some(&last), at - S(2) + S(15)), Decision::Acquire);
}

#[test]
fn remote_timestamps_are_not_trusted() {
    // A renewTime far in the past (a skewed clock on the leader's node) does not make the
    // lease look expired: only the local observation counts.
    let t0 = Instant::now();
    let mut e = Elector::new("me");
    let skewed = held_by("other", 0);
    assert!(matches!(
        e.observe(Some(&skewed), t0),
        Decision::Standby { .. }
    ));
}

#[test]
fn our_own_lease_is_renewed() {
    let mut e = Elector::new("me");
    assert_eq!(
        e.observe(Some(&held_by("me", 1_000)), Instant::now()),
        Decision::Renew
    );
}

#[test]
fn a_shorter_lease_duration_in_the_record_wins() {
    // A released lease carries duration 1 s; a holder may also ask for less than ours.
    let t0 = Instant::now();
    let mut e = Elector::new("me");
    let r = Record {
        lease_duration: S(1),
        ..held_by("other", 1_000)
    };
    assert!(matches!(e.observe(Some(&r), t0), Decision::Standby { .. }));
    assert_eq!(e.observe(Some(&r), t0 + S(1)), Decision::Acquire);
}

#[test]
fn specs_count_transitions_and_keep_the_acquire_time() {
    let now = Timestamp::from_second(2_000).unwrap();
    let fresh = acquired_spec(None, "me", S(15), now);
    assert_eq!(fresh.holder_identity.as_deref(), Some("me"));
    assert_eq!(fresh.lease_transitions, Some(0));
    assert_eq!(fresh.lease_duration_seconds, Some(15));
    assert_eq!(fresh.acquire_time, Some(MicroTime(now)));

    let taken = acquired_spec(Some(&held_by("other", 1_000)), "me", S(15), now);
    assert_eq!(taken.lease_transitions, Some(4));

    let mine = held_by("me", 1_000);
    let renewed = renewed_spec(&mine, "me", S(15), now);
    assert_eq!(renewed.lease_transitions, Some(3));
    assert_eq!(renewed.acquire_time, mine.acquire_time.map(MicroTime));
    assert_eq!(renewed.renew_time, Some(MicroTime(now)));

    let released = released_spec(&mine, now);
    assert_eq!(released.holder_identity, None);
    assert_eq!(released.lease_duration_seconds, Some(1));
    assert_eq!(released.lease_transitions, Some(3));
    // After a release, the next taker counts one more transition.
    let record = Record::from_lease(
        &Lease {
            spec: Some(released),
            ..Lease::default()
        },
        S(15),
    );
    assert_eq!(
        acquired_spec(Some(&record), "next", S(15), now).lease_transitions,
        Some(4)
    );
}

#[test]
fn a_standby_looks_again_right_at_expiry() {
    assert_eq!(next_attempt_in(S(2), S(15)), S(2));
    assert_eq!(
        next_attempt_in(S(2), Duration::from_millis(700)),
        Duration::from_millis(710)
    );
    assert_eq!(
        next_attempt_in(S(2), Duration::ZERO),
        Duration::from_millis(10)
    );
}

#[test]
fn the_leader_steps_down_at_the_renew_deadline() {
    let t0 = Instant::now();
    assert!(!renew_deadline_passed(t0, t0 + S(9), S(10)));
    assert!(renew_deadline_passed(t0, t0 + S(10), S(10)));
    // A clock that went backwards is not a passed deadline.
    assert!(!renew_deadline_passed(t0 + S(5), t0, S(10)));
}

#[test]
fn timing_must_let_the_leader_stop_before_a_standby_starts() {
    assert!(Timing::new(S(15), S(10), S(2)).is_ok());
    assert_eq!(Timing::default(), Timing::new(S(15), S(10), S(2)).unwrap());
    let e = Timing::new(S(10), S(10), S(2)).unwrap_err();
    assert!(
        e.to_string().contains("shorter than the lease duration"),
        "{e}"
    );
    assert!(Timing::new(S(15), S(2), S(2)).is_err());
    assert!(Timing::new(S(15), S(10), S(0)).is_err());
}

#[test]
fn identities_are_unique_per_process_start() {
    let a = default_identity();
    let b = default_identity();
    assert_ne!(a, b);
    assert!(a.contains('_'));
}
