//! What happens to a message after it is accepted: scripted or random
//! fates, the planned status callbacks and their parameters, the ledger of
//! messages and counts.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use metrics::counter;
use rand::Rng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::bucket::TokenBucket;
use super::errors::{ApiError, delivery_error_message};
pub use crate::config::{FailureMix, SimConfig};
use crate::twilio::API_VERSION;

pub(super) const MAX_SCRIPT_DELAY_MS: u64 = 600_000;

/// A scripted outcome for the next send to a recipient; `{}` = plain success.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Outcome {
    #[serde(default)]
    pub(super) api_error: Option<i32>,
    #[serde(default)]
    pub(super) delivery: Option<String>,
    #[serde(default)]
    pub(super) error_code: Option<i32>,
    #[serde(default)]
    pub(super) delay_ms: u64,
}

impl Outcome {
    pub(super) fn validate(&self) -> Result<(), String> {
        if self.api_error.is_some() && (self.delivery.is_some() || self.error_code.is_some()) {
            return Err("an outcome has api_error or delivery, not both".into());
        }
        match (self.delivery.as_deref(), self.error_code) {
            (None | Some("delivered"), Some(_)) => {
                return Err("error_code needs delivery \"undelivered\" or \"failed\"".into());
            }
            (None | Some("delivered" | "undelivered" | "failed"), _) => {}
            (Some(other), _) => {
                return Err(format!(
                    "unknown delivery {other:?} (delivered, undelivered, failed)"
                ));
            }
        }
        if self.delay_ms > MAX_SCRIPT_DELAY_MS {
            return Err(format!("delay_ms must be at most {MAX_SCRIPT_DELAY_MS}"));
        }
        Ok(())
    }

    pub(super) fn fate(&self) -> Option<Fate> {
        match self.delivery.as_deref()? {
            "delivered" => Some(Fate::Delivered),
            status => Some(Fate::Failed {
                status: status.to_string(),
                code: self
                    .error_code
                    .unwrap_or(if status == "failed" { 30008 } else { 30003 }),
            }),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ScriptRequest {
    pub(super) to: String,
    pub(super) outcomes: Vec<Outcome>,
}

/// How an accepted message ends.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Fate {
    Delivered,
    Failed { status: String, code: i32 },
}

impl Fate {
    pub(super) fn status(&self) -> &str {
        match self {
            Fate::Delivered => "delivered",
            Fate::Failed { status, .. } => status,
        }
    }
}

/// `u` uniform in [0, 1) picks a failure by cumulative rate, else delivered.
pub(super) fn random_fate(failures: &[FailureMix], u: f64) -> Fate {
    let mut acc = 0.0;
    for f in failures {
        acc += f.rate;
        if u < acc {
            return Fate::Failed {
                status: f.status.clone(),
                code: f.code,
            };
        }
    }
    Fate::Delivered
}

/// One callback to fire `at` after the send.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Planned {
    pub(super) status: String,
    pub(super) error_code: Option<i32>,
    pub(super) at: Duration,
    /// `I-Twilio-Idempotency-Token`; a duplicate carries the same one.
    pub(super) token: String,
}

pub(super) fn jittered(base: Duration, jitter: Duration, rng: &mut StdRng) -> Duration {
    let j = jitter.as_micros().min(i64::MAX as u128) as i64;
    let delta = if j > 0 { rng.random_range(-j..=j) } else { 0 };
    let micros = (base.as_micros().min(i64::MAX as u128) as i64)
        .saturating_add(delta)
        .max(0);
    Duration::from_micros(micros as u64)
}

/// The callbacks of one message, sorted by firing time; a delivered
/// WhatsApp message is `read` too.
pub(super) fn plan_callbacks(
    cfg: &SimConfig,
    fate: &Fate,
    whatsapp: bool,
    rng: &mut StdRng,
) -> Vec<Planned> {
    let mut steps: Vec<(String, Option<i32>)> = Vec::with_capacity(4);
    let mut final_added = false;
    for s in &cfg.callback_statuses {
        match (s.as_str(), fate) {
            ("delivered", Fate::Failed { status, code }) => {
                steps.push((status.clone(), Some(*code)));
                final_added = true;
            }
            _ => steps.push((s.clone(), None)),
        }
    }
    if let Fate::Failed { status, code } = fate
        && !final_added
    {
        steps.push((status.clone(), Some(*code)));
    }
    if whatsapp && *fate == Fate::Delivered && steps.iter().any(|(s, _)| s == "delivered") {
        steps.push(("read".into(), None));
    }
    let mut plan = Vec::with_capacity(steps.len() + 2);
    let mut prev = Duration::ZERO;
    for (status, error_code) in steps {
        let base = match status.as_str() {
            "queued" => Duration::ZERO,
            "sent" => cfg.sent_after,
            "read" => cfg.delivered_after + cfg.sent_after,
            _ => cfg.delivered_after,
        };
        let at = jittered(base, cfg.jitter, rng).max(prev);
        prev = at;
        let token = uuid::Uuid::new_v4().to_string();
        plan.push(Planned {
            status,
            error_code,
            at,
            token,
        });
    }
    let n = plan.len();
    if n >= 2 && cfg.reorder_rate > 0.0 && rng.random_bool(cfg.reorder_rate) {
        let (earlier, last) = (plan[n - 2].at, plan[n - 1].at);
        plan[n - 1].at = earlier;
        plan[n - 2].at = last.max(earlier + Duration::from_millis(1));
    }
    if cfg.duplicate_rate > 0.0 {
        let mut dups = Vec::new();
        for p in &plan {
            if rng.random_bool(cfg.duplicate_rate) {
                dups.push(Planned {
                    at: p.at + Duration::from_millis(rng.random_range(1..=50)),
                    ..p.clone()
                });
            }
        }
        plan.extend(dups);
    }
    plan.sort_by_key(|p| p.at);
    plan
}

/// queued < sent < final < read: a message's status only moves forward.
pub(super) fn rank(status: &str) -> u8 {
    match status {
        "queued" => 0,
        "sent" => 1,
        "read" => 3,
        _ => 2,
    }
}

#[derive(Debug)]
pub(super) struct Message {
    pub(super) sid: String,
    pub(super) to: String,
    pub(super) from: Option<String>,
    pub(super) messaging_service_sid: Option<String>,
    pub(super) body: String,
    pub(super) num_media: usize,
    pub(super) status: String,
    pub(super) error_code: Option<i32>,
    pub(super) created: chrono::DateTime<chrono::Utc>,
    pub(super) updated: chrono::DateTime<chrono::Utc>,
    pub(super) sent: Option<chrono::DateTime<chrono::Utc>>,
}

impl Message {
    pub(super) fn json(&self, account: &str) -> Value {
        json!({
            "sid": self.sid,
            "account_sid": account,
            "to": self.to,
            "from": self.from,
            "messaging_service_sid": self.messaging_service_sid,
            "body": self.body,
            "status": self.status,
            "num_segments": "1",
            "num_media": self.num_media.to_string(),
            "direction": "outbound-api",
            "api_version": API_VERSION,
            "date_created": self.created.to_rfc2822(),
            "date_updated": self.updated.to_rfc2822(),
            "date_sent": self.sent.map(|d| d.to_rfc2822()),
            "error_code": self.error_code,
            "error_message": self.error_code.map(delivery_error_message),
            "price": null,
            "price_unit": "USD",
            "uri": format!("/{API_VERSION}/Accounts/{account}/Messages/{}.json", self.sid),
        })
    }
}

#[derive(Debug, Default, Serialize)]
pub(super) struct Stats {
    pub(super) total: u64,
    pub(super) accepted: u64,
    pub(super) rejected: BTreeMap<i32, u64>,
    pub(super) per_recipient: BTreeMap<String, u64>,
    pub(super) per_second: BTreeMap<i64, u64>,
    /// Accepted sends by the final status planned for them.
    pub(super) fates: BTreeMap<String, u64>,
    pub(super) callbacks: CallbackStats,
}

#[derive(Debug, Default, Serialize)]
pub(super) struct CallbackStats {
    pub(super) sent: u64,
    pub(super) failed: u64,
}

/// Everything mutable, behind one mutex never held across an await.
pub(super) struct Ledger {
    pub(super) messages: Vec<Message>,
    pub(super) index: HashMap<String, usize>,
    pub(super) by_to: HashMap<String, Vec<usize>>,
    pub(super) scripts: HashMap<String, VecDeque<Outcome>>,
    /// `whatsapp:+…` → when the person last wrote (`POST /sim/inbound`).
    pub(super) windows: HashMap<String, std::time::Instant>,
    pub(super) stats: Stats,
    pub(super) bucket: TokenBucket,
    pub(super) rng: StdRng,
    /// Cancelled on reset and shutdown: pending callbacks of the past stop.
    pub(super) generation: CancellationToken,
}

impl Ledger {
    pub(super) fn reject(&mut self, e: ApiError) -> Result<Value, ApiError> {
        *self.stats.rejected.entry(e.code).or_default() += 1;
        let outcome = if e.code == 20429 {
            "rate_limited"
        } else {
            "rejected"
        };
        counter!(crate::metrics::names::SIM_REQUESTS_TOTAL, "outcome" => outcome).increment(1);
        Err(e)
    }

    pub(super) fn insert(&mut self, m: Message, second: i64) {
        self.stats.accepted += 1;
        *self.stats.per_recipient.entry(m.to.clone()).or_default() += 1;
        *self.stats.per_second.entry(second).or_default() += 1;
        let i = self.messages.len();
        self.index.insert(m.sid.clone(), i);
        self.by_to.entry(m.to.clone()).or_default().push(i);
        self.messages.push(m);
    }
}

/// What a message's callbacks need.
pub(super) struct Target {
    pub(super) sid: String,
    pub(super) to: String,
    pub(super) from: Option<String>,
    pub(super) messaging_service_sid: Option<String>,
    pub(super) url: Option<String>,
}

pub(super) fn callback_params(account: &str, t: &Target, step: &Planned) -> Vec<(String, String)> {
    let mut p: Vec<(String, String)> = Vec::with_capacity(12);
    let mut add = |k: &str, v: &str| p.push((k.to_string(), v.to_string()));
    add("MessageSid", &t.sid);
    add("SmsSid", &t.sid);
    add("AccountSid", account);
    add("To", &t.to);
    if let Some(from) = &t.from {
        add("From", from);
    }
    if let Some(mss) = &t.messaging_service_sid {
        add("MessagingServiceSid", mss);
    }
    add("MessageStatus", &step.status);
    add("SmsStatus", &step.status);
    add("ApiVersion", API_VERSION);
    if let Some(code) = step.error_code {
        add("ErrorCode", &code.to_string());
        add("ErrorMessage", delivery_error_message(code));
    }
    p
}
