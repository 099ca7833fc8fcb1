//! The simulator's rate limit.

use std::time::Instant;

/// Token bucket: `rate` tokens/s up to `capacity`; rate 0 = unlimited.
#[derive(Debug)]
pub(super) struct TokenBucket {
    pub(super) rate: f64,
    pub(super) capacity: f64,
    pub(super) tokens: f64,
    pub(super) last: Instant,
}

impl TokenBucket {
    pub(super) fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let capacity = f64::from(if burst == 0 { rate.max(1) } else { burst });
        Self {
            rate: f64::from(rate),
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    pub(super) fn try_take(&mut self, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
