//! Per-user request rates on this edge: token buckets, refilled continuously.
//!
//! A user's bucket holds up to `per_minute` tokens and refills at `per_minute` per minute; a
//! request takes one, and one arriving to an empty bucket is answered 429 `M_LIMIT_EXCEEDED`
//! with the time until the next token (`retry_after_ms`). Buckets are per edge: with N edges
//! behind a balancer a user gets up to N times the rate (quotas that must hold across edges
//! live in the metadata service). Idle buckets are forgotten after ten minutes.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;

use crate::api::error::ApiError;

pub struct RateLimiter {
    what: &'static str,
    per_minute: u32,
    buckets: moka::sync::Cache<String, Arc<Mutex<Bucket>>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// `per_minute` 0: no limit.
    pub fn new(what: &'static str, per_minute: u32) -> Self {
        let buckets = moka::sync::Cache::builder().max_capacity(100_000).time_to_idle(Duration::from_secs(600)).build();
        Self { what, per_minute, buckets }
    }

    /// Takes one of `user`'s tokens, or refuses with 429.
    pub fn check(&self, user: &str) -> Result<(), ApiError> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let capacity = f64::from(self.per_minute);
        let bucket = self
            .buckets
            .get_with_by_ref(user, || Arc::new(Mutex::new(Bucket { tokens: capacity, at: Instant::now() })));
        let mut b = bucket.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let per_second = capacity / 60.0;
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_second).min(capacity);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            return Ok(());
        }
        let wait_ms = ((1.0 - b.tokens) / per_second * 1000.0).ceil() as u64;
        Err(ApiError {
            retry_after_ms: Some(wait_ms.max(1)),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "M_LIMIT_EXCEEDED",
                format!("Too many {} (limit {} a minute); retry later", self.what, self.per_minute),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_up_to_the_rate_then_429_with_the_wait_and_users_apart() {
        let limiter = RateLimiter::new("uploads", 3);
        for _ in 0..3 {
            limiter.check("@a:hs").expect("within the burst");
        }
        let e = limiter.check("@a:hs").expect_err("over");
        assert_eq!((e.status, e.errcode), (StatusCode::TOO_MANY_REQUESTS, "M_LIMIT_EXCEEDED"));
        // One token comes back every 20 s at 3 a minute.
        let wait = e.retry_after_ms.expect("retry_after_ms");
        assert!((19_000..=20_000).contains(&wait), "{wait}");
        limiter.check("@b:hs").expect("another user has a bucket of their own");
        assert!(RateLimiter::new("uploads", 0).check("@a:hs").is_ok(), "0 disables");
    }
}
