//! Rate limits: token buckets per connection and per user, and a count of connections per user.
//!
//! A bucket holds up to `burst` tokens and refills at `per_second`; each message (or join) takes
//! one. A client over its rate gets `rate_limited` errors; one that keeps going is closed (4029).

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::time::Instant;

pub struct TokenBucket {
    tokens: f64,
    per_second: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(per_second: u32, burst: u32) -> TokenBucket {
        TokenBucket {
            tokens: f64::from(burst),
            per_second: f64::from(per_second),
            burst: f64::from(burst),
            last: Instant::now(),
        }
    }

    /// Takes a token if there is one.
    pub fn take(&mut self) -> bool {
        self.refill();
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl TokenBucket {
    fn refill(&mut self) {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.last = now;
    }

    /// Whether the bucket has refilled completely: then it is no different from a new one.
    fn is_full(&mut self) -> bool {
        self.refill();
        self.tokens >= self.burst
    }
}

/// A token bucket per user, kept across that user's connections (closing and reopening must not
/// refill it). Full buckets are forgotten when the map grows: a new one is the same.
pub struct BucketPerUser {
    buckets: Mutex<HashMap<String, TokenBucket>>,
    per_second: u32,
    burst: u32,
}

/// Users beyond which full buckets are forgotten.
const KEEP_BUCKETS: usize = 10_000;

impl BucketPerUser {
    pub fn new(per_second: u32, burst: u32) -> BucketPerUser {
        BucketPerUser {
            buckets: Mutex::default(),
            per_second,
            burst,
        }
    }

    /// Takes one of `user`'s tokens if there is one.
    pub fn take(&self, user: &str) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= KEEP_BUCKETS {
            buckets.retain(|_, bucket| !bucket.is_full());
        }
        buckets
            .entry(user.to_owned())
            .or_insert_with(|| TokenBucket::new(self.per_second, self.burst))
            .take()
    }
}

/// Open connections per user, across WebSocket and SSE.
#[derive(Default)]
pub struct ConnectionsPerUser {
    counts: Mutex<HashMap<String, usize>>,
}

impl ConnectionsPerUser {
    /// Counts one more connection for `user`, unless that would exceed `max`.
    pub fn acquire(&self, user: &str, max: usize) -> bool {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(user.to_owned()).or_default();
        if *count >= max {
            return false;
        }
        *count += 1;
        true
    }

    pub fn release(&self, user: &str) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(user) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_bucket_allows_its_burst_then_its_rate() {
        let mut bucket = TokenBucket::new(10, 5);
        assert_eq!((0..8).filter(|_| bucket.take()).count(), 5, "the burst");
        tokio::time::advance(std::time::Duration::from_millis(300)).await;
        assert_eq!(
            (0..8).filter(|_| bucket.take()).count(),
            3,
            "10 per second for 0.3 s"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_users_bucket_outlives_its_connections_and_spares_other_users() {
        let opens = BucketPerUser::new(1, 2);
        assert!(opens.take("u1") && opens.take("u1"), "the burst");
        assert!(!opens.take("u1"), "then the rate");
        assert!(opens.take("u2"), "another user has a bucket of their own");
        tokio::time::advance(std::time::Duration::from_millis(1100)).await;
        assert!(opens.take("u1"), "refilled at the rate");
        assert!(!opens.take("u1"));
    }

    #[test]
    fn connections_per_user_are_capped_and_released() {
        let counts = ConnectionsPerUser::default();
        assert!(counts.acquire("u1", 2) && counts.acquire("u1", 2));
        assert!(!counts.acquire("u1", 2));
        assert!(counts.acquire("u2", 2), "per user");
        counts.release("u1");
        assert!(counts.acquire("u1", 2));
    }
}
