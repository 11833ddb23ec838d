//! Retrying with backoff: exponential, capped, and with full jitter.
//!
//! When the database restarts, every relay loses its connections at the same instant. Waits that
//! only doubled would bring them all back at the same instants too, each time a burst of
//! connection attempts against a database that is starting up. With full jitter each wait is
//! drawn uniformly between zero and the current ceiling, which doubles after each failure up to a
//! cap: the attempts spread out, and on average come sooner than without jitter.

use std::time::Duration;

use rand::Rng;

/// The waits between attempts of one retry loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    ceiling: Duration,
}

impl Backoff {
    /// Waits of at most `min` at first, doubling to at most `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            ceiling: min,
        }
    }

    /// The wait before the next attempt; the one after may be up to twice as long.
    pub fn next_wait(&mut self) -> Duration {
        let wait = rand::rng().random_range(Duration::ZERO..=self.ceiling);
        self.ceiling = (self.ceiling * 2).min(self.max);
        wait
    }

    /// After a success: the next failure starts again from the shortest waits.
    pub fn reset(&mut self) {
        self.ceiling = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_stay_under_a_ceiling_that_doubles_to_the_cap_and_resets() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut backoff = Backoff::new(min, max);
        let mut ceiling = min;
        for _ in 0..20 {
            let wait = backoff.next_wait();
            assert!(wait <= ceiling, "{wait:?} above {ceiling:?}");
            ceiling = (ceiling * 2).min(max);
        }
        assert_eq!(ceiling, max, "the ceiling stops at the cap");
        backoff.reset();
        for _ in 0..100 {
            assert!(backoff.next_wait() <= min * 2);
            backoff.reset();
        }
    }

    #[test]
    fn waits_are_spread_out() {
        let max = Duration::from_secs(5);
        let mut backoff = Backoff::new(max, max);
        let waits: Vec<Duration> = (0..200).map(|_| backoff.next_wait()).collect();
        let short = waits.iter().filter(|w| **w < max / 2).count();
        // Uniform over [0, 5 s]: about half fall in each half (200 draws all landing in one
        // half has a probability of 2^-199).
        assert!((1..200).contains(&short), "{short} of 200 below half");
        assert!(waits.iter().all(|w| *w <= max));
    }
}
