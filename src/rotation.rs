//! When to come back for a secret: pure functions of what was fetched, the time and a random
//! number, so every rule is unit-tested without a clock.
//!
//! The rules (DESIGN.md §6, as Vault Agent and consul-template apply them):
//! - no lease, no expiry (KV, local files): poll every `poll` with up to +10% jitter, so that
//!   volumes mounted at the same moment do not refresh in lock-step;
//! - non-renewable lease: refetch at 90% ± 5% of the lease;
//! - renewable lease: renew at about 2/3 of the remaining lease minus a 10–20% random grace;
//!   when a renewal no longer extends the lease and what is left is below 4× the grace,
//!   fetch a new secret instead;
//! - a value issued for us with a hard expiry (a PKI certificate): reissue at 90% of its
//!   lifetime;
//! - a stored object with an expiry attribute (Key Vault `exp`, a Key Vault certificate): poll
//!   like any other object, since the source may get a new version at any moment; the expiry
//!   only makes it due sooner (at 90% of what is left, never sooner than a tenth of the poll,
//!   and an expiry already past changes nothing);
//! - after a failure: exponential backoff 1-2-4-8-16 s with ±20% jitter, never sooner than the
//!   provider's `Retry-After`.
//!
//! `jitter` arguments are uniform random numbers in [0, 1), drawn by the caller.

use std::time::Duration;

/// Shortest delay any rule may produce: protects providers from a tight loop when a lease is
/// tiny or a clock is off.
pub const MIN_DELAY: Duration = Duration::from_millis(250);
/// Ceiling of the failure backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(16);

/// What the scheduler should do next for one object.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Next {
    /// Fetch the object again after the delay.
    Refetch(Duration),
    /// Renew the lease after the delay.
    Renew(Duration),
}

impl Next {
    pub fn delay(self) -> Duration {
        match self {
            Next::Refetch(d) | Next::Renew(d) => d,
        }
    }
}

/// What is known about a value that was just fetched or renewed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Validity {
    /// No lease and no expiry: poll.
    Unleased,
    /// A lease that cannot be renewed, `remaining` from now.
    Lease { remaining: Duration },
    /// A renewable lease. `extended` is false when the last renewal did not move the end of the
    /// lease (max TTL reached).
    RenewableLease { remaining: Duration, extended: bool },
    /// A value issued for us with a hard end of life (a PKI certificate), `lifetime` in total
    /// and `remaining` now.
    Expires {
        lifetime: Duration,
        remaining: Duration,
    },
    /// A stored object that says when it expires, `remaining` from now (zero when past): it
    /// can change at the source at any time.
    PolledUntil { remaining: Duration },
}

fn clamp(d: Duration) -> Duration {
    d.max(MIN_DELAY)
}

/// The next step for an object, from its validity.
pub fn next(validity: Validity, poll: Duration, jitter: f64) -> Next {
    let j = jitter.clamp(0.0, 1.0);
    match validity {
        Validity::Unleased => Next::Refetch(clamp(poll.mul_f64(1.0 + 0.1 * j))),
        Validity::PolledUntil { remaining } => {
            let polled = poll.mul_f64(1.0 + 0.1 * j);
            if remaining.is_zero() {
                // Past its expiry: a source that keeps serving it gets no extra requests.
                return Next::Refetch(clamp(polled));
            }
            // Come back before it ends, but never more often than a tenth of the poll: a value
            // near its end is not refetched in a tight loop.
            let before_end = remaining.mul_f64(0.9).max(poll / 10);
            Next::Refetch(clamp(polled.min(before_end)))
        }
        Validity::Lease { remaining } => Next::Refetch(clamp(remaining.mul_f64(0.85 + 0.1 * j))),
        Validity::RenewableLease {
            remaining,
            extended,
        } => {
            let grace = remaining.mul_f64(0.10 + 0.10 * j);
            if !extended && remaining < grace * 4 + MIN_DELAY {
                // The lease cannot grow any more and is about to end: replace the secret while
                // the current one is still valid.
                return Next::Refetch(clamp(remaining.saturating_sub(grace)));
            }
            if !extended {
                // Past max TTL growth: keep it until the last stretch, then refetch.
                return Next::Refetch(clamp(remaining.saturating_sub(grace * 4)));
            }
            Next::Renew(clamp((remaining * 2 / 3).saturating_sub(grace)))
        }
        Validity::Expires {
            lifetime,
            remaining,
        } => {
            // Reissue at 90% of the lifetime, i.e. when 10% of it is left.
            Next::Refetch(clamp(remaining.saturating_sub(lifetime / 10)))
        }
    }
}

/// Delay before retry number `failures` (1 for the first failure).
pub fn backoff(failures: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
    let j = jitter.clamp(0.0, 1.0);
    let exp = failures.saturating_sub(1).min(4);
    let base = Duration::from_secs(1u64 << exp).min(MAX_BACKOFF);
    let jittered = base.mul_f64(0.8 + 0.4 * j);
    match retry_after {
        // Honour the provider: never earlier than it asked, plus a little spread so a fleet of
        // waiters does not return in the same millisecond.
        Some(ra) => jittered.max(ra + ra.mul_f64(0.1 * j)),
        None => jittered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn unleased_polls_with_bounded_jitter() {
        assert_eq!(next(Validity::Unleased, S(120), 0.0), Next::Refetch(S(120)));
        assert_eq!(
            next(Validity::Unleased, S(120), 0.999).delay().as_secs(),
            131
        );
        assert_eq!(
            next(Validity::Unleased, Duration::ZERO, 0.5).delay(),
            MIN_DELAY
        );
    }

    #[test]
    fn non_renewable_lease_refetches_at_90_percent_plus_minus_5() {
        for j in [0.0, 0.5, 0.999] {
            let d = next(Validity::Lease { remaining: S(100) }, S(120), j).delay();
            assert!(d >= S(85) && d <= S(95), "{d:?}");
        }
    }

    #[test]
    fn renewable_lease_renews_at_two_thirds_minus_grace() {
        for j in [0.0, 0.5, 0.999] {
            match next(
                Validity::RenewableLease {
                    remaining: S(300),
                    extended: true,
                },
                S(120),
                j,
            ) {
                Next::Renew(d) => assert!(d >= S(140) && d <= S(170), "{d:?}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn lease_that_stopped_growing_is_replaced_before_it_ends() {
        // Remaining 30 s of a lease that no longer extends: refetch well before the end.
        match next(
            Validity::RenewableLease {
                remaining: S(30),
                extended: false,
            },
            S(120),
            0.5,
        ) {
            Next::Refetch(d) => assert!(d < S(30) && d >= S(10), "{d:?}"),
            other => panic!("{other:?}"),
        }
        // Even a tiny remainder never yields a zero delay (no tight loop).
        let d = next(
            Validity::RenewableLease {
                remaining: Duration::from_millis(10),
                extended: false,
            },
            S(120),
            0.5,
        );
        assert_eq!(d, Next::Refetch(MIN_DELAY));
    }

    #[test]
    fn certificates_reissue_at_90_percent_of_lifetime() {
        let d = next(
            Validity::Expires {
                lifetime: S(1000),
                remaining: S(1000),
            },
            S(120),
            0.3,
        );
        assert_eq!(d, Next::Refetch(S(900)));
        let d = next(
            Validity::Expires {
                lifetime: S(1000),
                remaining: S(50),
            },
            S(120),
            0.3,
        );
        assert_eq!(d, Next::Refetch(MIN_DELAY));
    }

    #[test]
    fn stored_objects_with_an_expiry_are_polled_and_only_come_sooner() {
        // A Key Vault secret with a one-year expiry: polled like any other (the defect was a
        // refresh at 90% of a year).
        let year = S(365 * 86_400);
        assert_eq!(
            next(Validity::PolledUntil { remaining: year }, S(5), 0.0),
            Next::Refetch(S(5))
        );
        // An expiry inside the poll interval brings the fetch before it.
        assert_eq!(
            next(Validity::PolledUntil { remaining: S(60) }, S(120), 0.0),
            Next::Refetch(S(54))
        );
        // Close to the end: no tighter than a tenth of the poll.
        assert_eq!(
            next(Validity::PolledUntil { remaining: S(2) }, S(120), 0.0),
            Next::Refetch(S(12))
        );
        // Already past: the plain poll.
        assert_eq!(
            next(
                Validity::PolledUntil {
                    remaining: Duration::ZERO
                },
                S(120),
                0.0
            ),
            Next::Refetch(S(120))
        );
    }

    #[test]
    fn backoff_doubles_to_a_ceiling_and_honours_retry_after() {
        let mid: Vec<u64> = (1..=7).map(|n| backoff(n, None, 0.5).as_secs()).collect();
        assert_eq!(mid, [1, 2, 4, 8, 16, 16, 16]);
        for j in [0.0, 0.999] {
            let d = backoff(1, None, j);
            assert!(d >= Duration::from_millis(800) && d <= Duration::from_millis(1200));
        }
        // Retry-After wins when it is longer than the backoff, and is never undercut.
        for j in [0.0, 0.5, 0.999] {
            let d = backoff(1, Some(S(30)), j);
            assert!(d >= S(30) && d <= S(33), "{d:?}");
        }
    }
}

/// The timing rules over the whole input space: any lease length, any jitter, any failure count.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn dur() -> impl Strategy<Value = Duration> {
        (0u64..10 * 365 * 86_400_000).prop_map(Duration::from_millis)
    }

    proptest! {
        #[test]
        fn never_sooner_than_the_floor_and_never_after_the_value_ends(
            remaining in dur(),
            lifetime_extra in dur(),
            extended in any::<bool>(),
            poll in dur(),
            jitter in 0.0f64..1.0,
        ) {
            for v in [
                Validity::Unleased,
                Validity::Lease { remaining },
                Validity::RenewableLease { remaining, extended },
                Validity::Expires { lifetime: remaining + lifetime_extra, remaining },
            ] {
                let d = next(v, poll, jitter).delay();
                prop_assert!(d >= MIN_DELAY, "{:?}: {:?}", v, d);
                let polled = next(Validity::PolledUntil { remaining }, poll, jitter).delay();
                // A stored object with an expiry is never due later than a plain poll, and
                // never sooner than a tenth of it.
                prop_assert!(polled <= next(Validity::Unleased, poll, jitter).delay());
                prop_assert!(polled >= (poll / 10).max(MIN_DELAY));
                match v {
                    Validity::Unleased => {
                        prop_assert!(d <= poll.mul_f64(1.1).max(MIN_DELAY), "{:?}", d)
                    }
                    // Anything with an end is acted on before the end (or at the floor when
                    // the end is nearer than the floor).
                    _ => prop_assert!(
                        d <= remaining.max(MIN_DELAY) && (d < remaining || d == MIN_DELAY),
                        "{:?}: {:?}",
                        v,
                        d
                    ),
                }
            }
        }

        #[test]
        fn a_renewable_lease_is_renewed_in_its_first_two_thirds(
            remaining in dur(),
            jitter in 0.0f64..1.0,
        ) {
            let v = Validity::RenewableLease { remaining, extended: true };
            if let Next::Renew(d) = next(v, Duration::from_secs(60), jitter) {
                prop_assert!(d <= (remaining * 2 / 3).max(MIN_DELAY));
            } else {
                prop_assert!(false, "an extending lease is renewed");
            }
        }

        #[test]
        fn backoff_grows_to_its_ceiling_and_honours_retry_after(
            failures in 1u32..1000,
            retry_after in proptest::option::of(dur()),
            jitter in 0.0f64..1.0,
        ) {
            let d = backoff(failures, retry_after, jitter);
            let next = backoff(failures + 1, retry_after, jitter);
            prop_assert!(next >= d, "retry {} waits {:?}, retry {} {:?}", failures, d, failures + 1, next);
            match retry_after {
                Some(ra) => prop_assert!(d >= ra && d <= (MAX_BACKOFF.mul_f64(1.2)).max(ra.mul_f64(1.1))),
                None => prop_assert!(d >= Duration::from_millis(800) && d <= MAX_BACKOFF.mul_f64(1.2)),
            }
        }
    }
}
