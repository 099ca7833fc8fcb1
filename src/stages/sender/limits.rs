//! Rate limits that hold across every sender process: each process takes
//! its share of the `sends` partitions as its share of every limit.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use uuid::Uuid;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tracing::info;

use crate::config::SenderConfig;
use crate::model::Channel;

pub(super) type Limiter = Arc<DefaultDirectRateLimiter>;

/// Per-campaign and per-sender-and-channel limiters, scaled by this
/// process's share of the `sends` partitions.
pub struct Limits {
    sends_topic: String,
    partitions: usize,
    burst: u32,
    sms_rate: u32,
    whatsapp_rate: u32,
    share: Mutex<f64>,
    sms: Mutex<Option<(f64, Limiter)>>,
    whatsapp: Mutex<Option<(f64, Limiter)>>,
    campaigns: Mutex<HashMap<Uuid, (f64, Limiter)>>,
}

impl Limits {
    pub fn new(sends_topic: &str, partitions: usize, cfg: &SenderConfig) -> Self {
        Self {
            sends_topic: sends_topic.to_string(),
            partitions: partitions.max(1),
            burst: cfg.burst.max(1),
            sms_rate: cfg.sms_rate_limit().unwrap_or(0),
            whatsapp_rate: cfg.whatsapp_rate_limit,
            share: Mutex::new(1.0),
            sms: Mutex::new(None),
            whatsapp: Mutex::new(None),
            campaigns: Mutex::new(HashMap::new()),
        }
    }

    pub(super) fn assigned(&self, owned: &[(String, i32)]) {
        let mine = owned.iter().filter(|(t, _)| *t == self.sends_topic).count();
        // Owning no `sends` partition (only retry topics) still sends at the
        // smallest share rather than not at all.
        let share = mine.max(1) as f64 / self.partitions as f64;
        *self.share.lock().unwrap_or_else(|p| p.into_inner()) = share.min(1.0);
        info!(share, "sender rate share");
    }

    /// The most messages the sender calls at once under a limit: half the
    /// burst (the limiters hold the other half), since a chunk's calls land
    /// together up to one chunk after their permits.
    pub(super) fn max_chunk(&self) -> usize {
        (self.burst / 2).max(1) as usize
    }

    /// A limiter for this process's share: `per_second` is already scaled;
    /// its burst is the half of the configured one that chunks leave,
    /// scaled the same way, so the group as a whole never goes over the
    /// limit plus the configured burst in any second.
    fn make(&self, per_second: f64, share: f64) -> Limiter {
        let period = Duration::from_secs_f64(1.0 / per_second.max(1e-3));
        let burst = self.burst - self.burst / 2;
        let burst = (burst as f64 * share).round() as u32;
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        Arc::new(RateLimiter::direct(quota))
    }

    fn scaled(&self, slot: &mut Option<(f64, Limiter)>, rate: u32) -> Limiter {
        let share = *self.share.lock().unwrap_or_else(|p| p.into_inner());
        let want = rate as f64 * share;
        match slot {
            Some((r, l)) if (*r - want).abs() < 1e-9 => l.clone(),
            _ => {
                let l = self.make(want, share);
                *slot = Some((want, l.clone()));
                l
            }
        }
    }

    /// The sender's limit on `channel` (messages/s, whole group), if any.
    pub(super) fn channel_rate(&self, channel: Channel) -> Option<u32> {
        let rate = match channel {
            Channel::Sms => self.sms_rate,
            Channel::Whatsapp => self.whatsapp_rate,
        };
        (rate > 0).then_some(rate)
    }

    /// This process's share of the sender's limiter on `channel`.
    pub(super) fn channel(&self, channel: Channel) -> Option<Limiter> {
        let rate = self.channel_rate(channel)?;
        let slot = match channel {
            Channel::Sms => &self.sms,
            Channel::Whatsapp => &self.whatsapp,
        };
        let mut g = slot.lock().unwrap_or_else(|p| p.into_inner());
        Some(self.scaled(&mut g, rate))
    }

    pub(super) fn campaign(&self, id: Uuid, rate: u32) -> Limiter {
        let mut all = self.campaigns.lock().unwrap_or_else(|p| p.into_inner());
        let mut slot = all.remove(&id);
        let l = self.scaled(&mut slot, rate);
        if let Some(s) = slot {
            all.insert(id, s);
        }
        l
    }
}
