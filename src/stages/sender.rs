//! `sender`: send records → provider calls, at most once per message.
//!
//! At send time, per message: not QUEUED → nothing (already sent, final, or
//! claimed); opted out → FAILED with a suppression reason, no call (the
//! opt-out confirmation excepted); campaign paused (or not yet running) →
//! held; cancelled or completed → FAILED; a retry delay or quiet hours in the
//! recipient's time zone → held until then. Held messages wait in Postgres
//! (`parked_until`) and the [`Pump`] puts them back on `sends` when due.
//!
//! The rest is paced by the campaign's and the sender number's governor
//! limiters — each process takes its share of partitions of `sends` as its
//! share of every limit, so the limits hold across the group — then claimed
//! (QUEUED → SENDING, committed) right before the call. The answer: SENT with the SID,
//! committed right after each chunk of calls
//! (and receipts parked for that SID applied); transient errors → QUEUED
//! again with a retry record on the next delay topic, FAILED after the last;
//! permanent → FAILED with the code (21610 also opts the user out). No answer
//! (timeout) leaves the row SENDING; the pump's reconciler looks it up at the
//! provider after `reconcile-after` and sends it again only if the provider
//! never got it; no call starts later than `reconcile-after − timeout − 1s`
//! after its claim, so the reconciler never races a call in flight.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, NaiveTime, TimeZone, Utc};
use deadpool_postgres::{Pool, Transaction};
use futures::StreamExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use metrics::{counter, histogram};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::codec::Codec;
use crate::config::{ProviderConfig, SenderConfig};
use crate::kafka::Producer;
use crate::phone::Normalizer;
use crate::records::SendRequest;
use crate::runner::{Collector, InRecord, Item, Stage, StageError};

/// Provider credentials: `TWILIO_ACCOUNT_SID` and the first `TWILIO_AUTH_TOKEN`.
#[derive(Clone)]
pub struct Credentials {
    pub account_sid: String,
    pub auth_token: String,
}

impl Credentials {
    pub fn from_env() -> anyhow::Result<Self> {
        let account_sid = std::env::var("TWILIO_ACCOUNT_SID").unwrap_or_default();
        let auth_token = crate::bridge::tokens_from_env()
            .into_iter()
            .next()
            .unwrap_or_default();
        if account_sid.is_empty() || auth_token.is_empty() {
            anyhow::bail!("the sender needs TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN");
        }
        Ok(Self {
            account_sid,
            auth_token,
        })
    }
}

/// The provider's Messages API.
#[derive(Clone)]
pub struct Provider {
    pub http: reqwest::Client,
    pub cfg: ProviderConfig,
    pub creds: Credentials,
    /// `bridge.public-url` + `/webhooks/twilio/status`.
    pub status_callback: String,
}

/// What one provider call came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Sent(String),
    Transient(Option<i32>, String),
    Permanent(Option<i32>, String),
    /// No answer: the provider may or may not have the message.
    Unknown(String),
}

/// The provider's error classes (the rest of 4xx is permanent, 5xx and 429 transient).
pub fn classify(code: Option<i32>, http_status: u16, message: String) -> Outcome {
    match code {
        Some(20429 | 30001 | 30003 | 30008) => Outcome::Transient(code, message),
        Some(21211 | 21408 | 21610 | 21614 | 30004..=30007) => Outcome::Permanent(code, message),
        _ if http_status >= 500 || http_status == 429 => Outcome::Transient(code, message),
        _ => Outcome::Permanent(code, message),
    }
}

impl Provider {
    fn url(&self, tail: &str) -> String {
        format!(
            "{}/2010-04-01/Accounts/{}/{tail}",
            self.cfg.base_url.trim_end_matches('/'),
            self.creds.account_sid
        )
    }

    fn address(channel: &str, number: &str) -> String {
        if channel == "WHATSAPP" {
            format!("whatsapp:{number}")
        } else {
            number.to_string()
        }
    }

    /// `POST …/Messages.json`.
    pub async fn send(&self, channel: &str, to: &str, body: &str) -> Outcome {
        let mut form = vec![
            ("To", Self::address(channel, to)),
            ("Body", body.to_string()),
            ("StatusCallback", self.status_callback.clone()),
        ];
        if self.cfg.messaging_service_sid.is_empty() {
            form.push(("From", Self::address(channel, &self.cfg.from)));
        } else {
            form.push((
                "MessagingServiceSid",
                self.cfg.messaging_service_sid.clone(),
            ));
        }
        let started = Instant::now();
        let result = self
            .http
            .post(self.url("Messages.json"))
            .basic_auth(&self.creds.account_sid, Some(&self.creds.auth_token))
            .form(&form)
            .timeout(self.cfg.timeout)
            .send()
            .await;
        histogram!("ese_sender_provider_seconds").record(started.elapsed().as_secs_f64());
        let resp = match result {
            // The request never reached the provider: safe to try again.
            Err(e) if e.is_connect() => return Outcome::Transient(None, format!("connect: {e}")),
            Err(e) => return Outcome::Unknown(format!("no answer: {e}")),
            Ok(r) => r,
        };
        let status = resp.status().as_u16();
        let json: serde_json::Value = match resp.json().await {
            Ok(j) => j,
            Err(e) if status < 300 => return Outcome::Unknown(format!("unreadable answer: {e}")),
            Err(_) => serde_json::Value::Null,
        };
        if (200..300).contains(&status) {
            return match json.get("sid").and_then(|s| s.as_str()) {
                Some(sid) => Outcome::Sent(sid.to_string()),
                None => Outcome::Unknown(format!("answer {status} without a sid")),
            };
        }
        let code = json.get("code").and_then(|c| c.as_i64()).map(|c| c as i32);
        let message = json
            .get("message")
            .and_then(|m| m.as_str())
            .unwrap_or("")
            .to_string();
        classify(code, status, format!("HTTP {status}: {message}"))
    }

    /// The SID of a message to `to` with `body` created since `since`, if the provider has one.
    pub async fn find(
        &self,
        channel: &str,
        to: &str,
        body: &str,
        since: DateTime<Utc>,
    ) -> anyhow::Result<Option<String>> {
        let url = url::Url::parse_with_params(
            &self.url("Messages.json"),
            &[
                ("To", Self::address(channel, to).as_str()),
                ("PageSize", "100"),
            ],
        )?;
        let resp = self
            .http
            .get(url)
            .basic_auth(&self.creds.account_sid, Some(&self.creds.auth_token))
            .timeout(self.cfg.timeout)
            .send()
            .await?
            .error_for_status()?;
        let json: serde_json::Value = resp.json().await?;
        let since = since - chrono::Duration::minutes(1);
        let found = json
            .get("messages")
            .and_then(|m| m.as_array())
            .into_iter()
            .flatten()
            .find(|m| {
                let created = m
                    .get("date_created")
                    .and_then(|d| d.as_str())
                    .and_then(|d| DateTime::parse_from_rfc2822(d).ok());
                m.get("body").and_then(|b| b.as_str()) == Some(body)
                    && created.is_some_and(|c| c >= since)
            })
            .and_then(|m| m.get("sid").and_then(|s| s.as_str()).map(str::to_string));
        Ok(found)
    }
}

type Limiter = Arc<DefaultDirectRateLimiter>;

/// Per-campaign and per-sender-number limiters, scaled by this process's
/// share of the `sends` partitions.
pub struct Limits {
    sends_topic: String,
    partitions: usize,
    burst: u32,
    global_rate: u32,
    share: Mutex<f64>,
    global: Mutex<Option<(f64, Limiter)>>,
    campaigns: Mutex<HashMap<i64, (f64, Limiter)>>,
}

impl Limits {
    pub fn new(sends_topic: &str, partitions: usize, cfg: &SenderConfig) -> Self {
        Self {
            sends_topic: sends_topic.to_string(),
            partitions: partitions.max(1),
            burst: cfg.burst.max(1),
            global_rate: cfg.global_rate_limit,
            share: Mutex::new(1.0),
            global: Mutex::new(None),
            campaigns: Mutex::new(HashMap::new()),
        }
    }

    fn assigned(&self, owned: &[(String, i32)]) {
        let mine = owned.iter().filter(|(t, _)| *t == self.sends_topic).count();
        // Owning no `sends` partition (only retry topics) still sends at the
        // smallest share rather than not at all.
        let share = mine.max(1) as f64 / self.partitions as f64;
        *self.share.lock().unwrap_or_else(|p| p.into_inner()) = share.min(1.0);
        info!(share, "sender rate share");
    }

    /// A limiter for this process's share: `per_second` is already scaled; the
    /// burst is scaled the same way, so the group as a whole never goes over
    /// the limit plus the configured burst in any second.
    fn make(&self, per_second: f64, share: f64) -> Limiter {
        let period = Duration::from_secs_f64(1.0 / per_second.max(1e-3));
        let burst = (self.burst as f64 * share).round() as u32;
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

    fn global(&self) -> Option<Limiter> {
        (self.global_rate > 0).then(|| {
            let mut g = self.global.lock().unwrap_or_else(|p| p.into_inner());
            self.scaled(&mut g, self.global_rate)
        })
    }

    fn campaign(&self, id: i64, rate: u32) -> Limiter {
        let mut all = self.campaigns.lock().unwrap_or_else(|p| p.into_inner());
        let mut slot = all.remove(&id);
        let l = self.scaled(&mut slot, rate);
        if let Some(s) = slot {
            all.insert(id, s);
        }
        l
    }
}

/// The stage.
pub struct Sender {
    pub codec: Codec,
    pub pool: Pool,
    pub provider: Provider,
    pub cfg: SenderConfig,
    /// Retry topic N (1-based) at index N-1.
    pub retry_topics: Vec<String>,
    pub phones: Normalizer,
    pub default_tz: chrono_tz::Tz,
    pub limits: Limits,
}

const LOOKUP: &str = "
SELECT m.id, m.status, m.recipient_phone, m.channel, m.body, m.retry_count, m.campaign_id,
       c.status, c.rate_limit_per_second, c.quiet_hours_start, c.quiet_hours_end,
       u.consent_state, u.attributes ->> 'timezone'
  FROM messages m
  LEFT JOIN campaigns c ON c.id = m.campaign_id
  LEFT JOIN users u ON u.phone_number = m.recipient_phone
 WHERE m.id = ANY($1)";

/// Claims a few messages right before their calls; a campaign message only
/// while its campaign runs and its recipient has not opted out, so a pause or
/// an opt-out committed after the batch was looked up still stops the send
/// (within ~100 ms of sends, not after the batch).
const CLAIM: &str = "
UPDATE messages m SET status = 'SENDING', claimed_at = now(), updated_at = now(),
                      parked_until = NULL, parked_reason = NULL, send_kind = NULL
 WHERE m.id = ANY($1) AND m.status = 'QUEUED'
   AND (m.campaign_id IS NULL
        OR (EXISTS (SELECT 1 FROM campaigns c WHERE c.id = m.campaign_id AND c.status = 'RUNNING')
            AND NOT EXISTS (SELECT 1 FROM users u
                             WHERE u.phone_number = m.recipient_phone AND u.consent_state = 'OPT_OUT')))
RETURNING id";

const PARK: &str = "
UPDATE messages m SET parked_until = x.t, parked_reason = x.r, send_kind = x.k, updated_at = now()
  FROM unnest($1::bigint[], $2::timestamptz[], $3::text[], $4::text[]) AS x(id, t, r, k)
 WHERE m.id = x.id AND m.status = 'QUEUED'";

const FAIL: &str = "
UPDATE messages m SET status = 'FAILED', error_code = x.c, failure_reason = x.r,
                      parked_until = NULL, updated_at = now()
  FROM unnest($1::bigint[], $2::int[], $3::text[]) AS x(id, c, r)
 WHERE m.id = x.id AND m.status IN ('QUEUED', 'SENDING')";

const SENT: &str = "
UPDATE messages m SET status = 'SENT', provider_sid = x.sid, sent_at = now(), updated_at = now()
  FROM unnest($1::bigint[], $2::text[]) AS x(id, sid)
 WHERE m.id = x.id AND m.status = 'SENDING'";

const REQUEUE: &str = "
UPDATE messages m SET status = 'QUEUED', retry_count = m.retry_count + 1, error_code = x.c,
                      failure_reason = x.r, claimed_at = NULL, updated_at = now()
  FROM unnest($1::bigint[], $2::int[], $3::text[]) AS x(id, c, r)
 WHERE m.id = x.id AND m.status = 'SENDING'";

const APPLY_RECEIPTS: &str = "SELECT count(*) FROM ese_apply_receipts($1::text[])";

const OPT_OUT: &str = "SELECT ese_apply_consent($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[], $6::text[])";

/// A message as the sender sees it.
struct Msg {
    id: i64,
    status: String,
    phone: String,
    channel: String,
    body: String,
    retries: i32,
    campaign: Option<i64>,
    campaign_status: Option<String>,
    rate: Option<i32>,
    quiet: Option<(NaiveTime, NaiveTime)>,
    consent: Option<String>,
    timezone: Option<String>,
}

enum Decision {
    Nothing,
    Fail(&'static str),
    Park(DateTime<Utc>, &'static str),
    Send,
}

impl Sender {
    fn decide(&self, m: &Msg, send: &SendRequest, now: DateTime<Utc>) -> Decision {
        if m.status != "QUEUED" {
            return Decision::Nothing;
        }
        if m.consent.as_deref() == Some("OPT_OUT") && send.kind != "opt_out_confirmation" {
            return Decision::Fail("suppressed: recipient opted out");
        }
        match m.campaign_status.as_deref() {
            Some("CANCELLED") => return Decision::Fail("campaign cancelled"),
            Some("COMPLETED") => return Decision::Fail("campaign completed"),
            Some("RUNNING") | None => {}
            // Paused (or not started): held until it runs.
            Some(_) => return Decision::Park(now, "campaign not running"),
        }
        if let Some(t) = send.not_before.and_then(DateTime::from_timestamp_millis)
            && t > now
        {
            return Decision::Park(t, "retry delay");
        }
        if let Some((start, end)) = m.quiet
            && let Some(until) = quiet_until(now, self.timezone(m), start, end)
        {
            return Decision::Park(until, "quiet hours");
        }
        Decision::Send
    }

    /// The recipient's zone: attribute `timezone`, else the number's region, else the default.
    fn timezone(&self, m: &Msg) -> chrono_tz::Tz {
        m.timezone
            .as_deref()
            .and_then(|t| t.parse().ok())
            .or_else(|| {
                self.phones
                    .region(&m.phone)
                    .and_then(|r| region_zone(&r))
                    .and_then(|z| z.parse().ok())
            })
            .unwrap_or(self.default_tz)
    }
}

/// When the quiet window `[start, end)` (local time, may wrap midnight) that
/// `now` falls in ends, in UTC; `None` outside the window.
pub fn quiet_until(
    now: DateTime<Utc>,
    tz: chrono_tz::Tz,
    start: NaiveTime,
    end: NaiveTime,
) -> Option<DateTime<Utc>> {
    let local = now.with_timezone(&tz);
    let t = local.time();
    let inside = if start <= end {
        start <= t && t < end
    } else {
        t >= start || t < end
    };
    if !inside {
        return None;
    }
    let mut day = local.date_naive();
    if start > end && t >= start {
        day = day.succ_opt()?;
    }
    let end_local = day.and_time(end);
    let resolved = tz
        .from_local_datetime(&end_local)
        .earliest()
        // A gap (DST): an hour later always exists.
        .or_else(|| {
            tz.from_local_datetime(&(end_local + chrono::Duration::hours(1)))
                .earliest()
        })?;
    Some(resolved.with_timezone(&Utc))
}

/// The main time zone of a region, for numbers whose users gave none.
fn region_zone(region: &str) -> Option<&'static str> {
    Some(match region {
        "US" | "CA" => "America/New_York",
        "MX" => "America/Mexico_City",
        "BR" => "America/Sao_Paulo",
        "AR" => "America/Argentina/Buenos_Aires",
        "CO" => "America/Bogota",
        "GB" => "Europe/London",
        "IE" => "Europe/Dublin",
        "PT" => "Europe/Lisbon",
        "ES" => "Europe/Madrid",
        "FR" => "Europe/Paris",
        "DE" => "Europe/Berlin",
        "IT" => "Europe/Rome",
        "NL" => "Europe/Amsterdam",
        "BE" => "Europe/Brussels",
        "CH" => "Europe/Zurich",
        "AT" => "Europe/Vienna",
        "PL" => "Europe/Warsaw",
        "SE" => "Europe/Stockholm",
        "NO" => "Europe/Oslo",
        "DK" => "Europe/Copenhagen",
        "FI" => "Europe/Helsinki",
        "GR" => "Europe/Athens",
        "TR" => "Europe/Istanbul",
        "RU" => "Europe/Moscow",
        "ZA" => "Africa/Johannesburg",
        "NG" => "Africa/Lagos",
        "KE" => "Africa/Nairobi",
        "EG" => "Africa/Cairo",
        "AE" => "Asia/Dubai",
        "SA" => "Asia/Riyadh",
        "IL" => "Asia/Jerusalem",
        "IN" => "Asia/Kolkata",
        "PK" => "Asia/Karachi",
        "SG" => "Asia/Singapore",
        "MY" => "Asia/Kuala_Lumpur",
        "ID" => "Asia/Jakarta",
        "PH" => "Asia/Manila",
        "TH" => "Asia/Bangkok",
        "VN" => "Asia/Ho_Chi_Minh",
        "CN" => "Asia/Shanghai",
        "HK" => "Asia/Hong_Kong",
        "JP" => "Asia/Tokyo",
        "KR" => "Asia/Seoul",
        "AU" => "Australia/Sydney",
        "NZ" => "Pacific/Auckland",
        _ => return None,
    })
}

impl Stage for Sender {
    type Input = SendRequest;

    fn name(&self) -> &'static str {
        "sender"
    }

    async fn decode(&self, record: &InRecord) -> Result<SendRequest, StageError> {
        Ok(self.codec.decode(record.payload()).await?)
    }

    fn assigned(&self, owned: &[(String, i32)]) {
        self.limits.assigned(owned);
    }

    async fn process(
        &self,
        tx: &Transaction<'_>,
        batch: &[Item<SendRequest>],
        out: &mut Collector,
    ) -> Result<(), StageError> {
        let mut seen = HashSet::new();
        let sends: Vec<(usize, &SendRequest)> = batch
            .iter()
            .enumerate()
            .filter(|(_, i)| seen.insert(i.value.message_id))
            .map(|(n, i)| (n, &i.value))
            .collect();
        let ids: Vec<i64> = sends.iter().map(|(_, s)| s.message_id).collect();
        let stmt = tx.prepare_cached(LOOKUP).await?;
        let mut msgs: HashMap<i64, Msg> = HashMap::new();
        for r in tx.query(&stmt, &[&ids]).await? {
            let quiet = match (
                r.get::<_, Option<NaiveTime>>(9),
                r.get::<_, Option<NaiveTime>>(10),
            ) {
                (Some(s), Some(e)) => Some((s, e)),
                _ => None,
            };
            let m = Msg {
                id: r.get(0),
                status: r.get(1),
                phone: r.get(2),
                channel: r.get(3),
                body: r.get(4),
                retries: r.get(5),
                campaign: r.get(6),
                campaign_status: r.get(7),
                rate: r.get(8),
                quiet,
                consent: r.get(11),
                timezone: r.get(12),
            };
            msgs.insert(m.id, m);
        }

        let now = Utc::now();
        let (mut park, mut fail, mut go) = (Vec::new(), Vec::new(), Vec::new());
        for (n, s) in &sends {
            let Some(m) = msgs.get(&s.message_id) else {
                out.dead_letter(*n, format!("message {} does not exist", s.message_id));
                continue;
            };
            match self.decide(m, s, now) {
                Decision::Nothing => {
                    counter!("ese_sender_sends_total", "outcome" => "skipped").increment(1)
                }
                Decision::Fail(reason) => fail.push((m.id, None, reason.to_string())),
                Decision::Park(until, reason) => park.push((m.id, until, reason, s.kind.clone())),
                Decision::Send => go.push(m.id),
            }
        }
        if !park.is_empty() {
            let ids: Vec<i64> = park.iter().map(|p| p.0).collect();
            let ts: Vec<DateTime<Utc>> = park.iter().map(|p| p.1).collect();
            let rs: Vec<&str> = park.iter().map(|p| p.2).collect();
            let ks: Vec<&str> = park.iter().map(|p| p.3.as_str()).collect();
            tx.execute(PARK, &[&ids, &ts, &rs, &ks]).await?;
            for p in &park {
                counter!("ese_sender_held_total", "reason" => p.2).increment(1);
            }
        }

        let requests: HashMap<i64, SendRequest> = sends
            .iter()
            .map(|(_, s)| (s.message_id, (*s).clone()))
            .collect();
        let mut work = Vec::with_capacity(go.len());
        for id in go {
            if let (Some(m), Some(s)) = (msgs.remove(&id), requests.get(&id)) {
                work.push((m, s.clone()));
            }
        }
        // Claims go in chunks of about 100 ms of sends at the slowest
        // campaign's rate (one commit per chunk, not per message), two chunks
        // ahead at most: a pause stops sends within ~200 ms.
        let slowest = work
            .iter()
            .filter_map(|(m, _)| m.rate)
            .min()
            .unwrap_or(i32::MAX);
        let concurrency = self.provider.cfg.concurrency.max(1);
        let chunk = ((slowest / 10).max(1) as usize).min(concurrency);
        let mut chunks = Vec::new();
        let mut rest = work.into_iter().peekable();
        while rest.peek().is_some() {
            chunks.push(rest.by_ref().take(chunk).collect::<Vec<_>>());
        }
        let attempts: Vec<(Msg, SendRequest, Option<Outcome>)> = futures::stream::iter(chunks)
            .map(|c| self.call_chunk(c))
            .buffer_unordered(2)
            .flat_map(futures::stream::iter)
            .collect()
            .await;
        let mut outcomes = Vec::with_capacity(attempts.len());
        let mut unclaimed = Vec::new();
        for (m, s, outcome) in attempts {
            match outcome {
                Some(o) => outcomes.push((m, s, o)),
                None => unclaimed.push((m.id, s.kind)),
            }
        }
        if !unclaimed.is_empty() {
            // Paused or opted out meanwhile (decided again when the pump puts
            // it back), or taken by another sender (the QUEUED guard skips it).
            let ids: Vec<i64> = unclaimed.iter().map(|u| u.0).collect();
            let ts = vec![now; ids.len()];
            let rs = vec!["campaign not running or recipient opted out"; ids.len()];
            let ks: Vec<&str> = unclaimed.iter().map(|u| u.1.as_str()).collect();
            tx.execute(PARK, &[&ids, &ts, &rs, &ks]).await?;
        }
        let mut requeue = Vec::new();
        let mut opt_outs = Vec::new();
        for (m, s, outcome) in outcomes {
            let label = match &outcome {
                Outcome::Sent(_) => "sent",
                Outcome::Transient(..) => "transient",
                Outcome::Permanent(..) => "permanent",
                Outcome::Unknown(_) => "unknown",
            };
            counter!("ese_sender_sends_total", "outcome" => label).increment(1);
            match outcome {
                // Recorded by `call_chunk` right after the call.
                Outcome::Sent(_) => {}
                Outcome::Transient(code, why) if (m.retries as u32) < self.cfg.max_retries => {
                    let n = m.retries as usize + 1;
                    let Some(topic) = self.retry_topics.get(n - 1) else {
                        fail.push((m.id, code, format!("no retry topic {n}: {why}")));
                        continue;
                    };
                    let delay = self
                        .cfg
                        .retry_delays
                        .get(n - 1)
                        .map(|d| **d)
                        .unwrap_or(Duration::from_secs(60));
                    let retry = SendRequest {
                        attempt: n as i32,
                        not_before: Some((now + delay).timestamp_millis()),
                        ..s.clone()
                    };
                    out.send(
                        topic,
                        m.phone.as_bytes(),
                        self.codec.encode(topic, &retry).await?,
                    );
                    requeue.push((m.id, code, why));
                }
                Outcome::Transient(code, why) => fail.push((
                    m.id,
                    code,
                    format!("gave up after {} retries: {why}", m.retries),
                )),
                Outcome::Permanent(code, why) => {
                    if code == Some(21610) {
                        opt_outs.push((m.phone.clone(), format!("provider-21610:{}", m.id)));
                    }
                    fail.push((m.id, code, why));
                }
                Outcome::Unknown(why) => {
                    warn!(message = m.id, error = %why, "provider outcome unknown; left SENDING for reconciliation");
                }
            }
        }
        if !requeue.is_empty() {
            let ids: Vec<i64> = requeue.iter().map(|r| r.0).collect();
            let codes: Vec<Option<i32>> = requeue.iter().map(|r| r.1).collect();
            let why: Vec<&str> = requeue.iter().map(|r| r.2.as_str()).collect();
            tx.execute(REQUEUE, &[&ids, &codes, &why]).await?;
        }
        if !fail.is_empty() {
            let ids: Vec<i64> = fail.iter().map(|f| f.0).collect();
            let codes: Vec<Option<i32>> = fail.iter().map(|f| f.1).collect();
            let why: Vec<&str> = fail.iter().map(|f| f.2.as_str()).collect();
            tx.execute(FAIL, &[&ids, &codes, &why]).await?;
        }
        if !opt_outs.is_empty() {
            let phones: Vec<&str> = opt_outs.iter().map(|o| o.0.as_str()).collect();
            let states = vec!["OPT_OUT"; phones.len()];
            let ats = vec![now; phones.len()];
            let sources = vec!["provider"; phones.len()];
            let keywords: Vec<Option<&str>> = vec![None; phones.len()];
            let events: Vec<&str> = opt_outs.iter().map(|o| o.1.as_str()).collect();
            tx.execute(
                OPT_OUT,
                &[&phones, &states, &ats, &sources, &keywords, &events],
            )
            .await?;
        }
        Ok(())
    }
}

impl Sender {
    /// Paces the chunk, then claims its rows (committed: a crash after this
    /// never re-sends) and calls the provider for each at once. Pacing comes
    /// first so a claim is followed by its call right away: the reconciler
    /// takes a row left SENDING longer than `reconcile-after` for one whose
    /// call never happened, so no call may start that late — one that would
    /// is not made, and the reconciler queues it again. `None`: not claimed
    /// (campaign paused or recipient opted out meanwhile, or taken by another
    /// sender).
    async fn call_chunk(
        &self,
        chunk: Vec<(Msg, SendRequest)>,
    ) -> Vec<(Msg, SendRequest, Option<Outcome>)> {
        for (m, _) in &chunk {
            self.pace(m).await;
        }
        let ids: Vec<i64> = chunk.iter().map(|(m, _)| m.id).collect();
        // Taken before the claim's round trip, so it errs on the early side.
        let claimed_at = Instant::now();
        let latest_start = self
            .cfg
            .reconcile_after
            .saturating_sub(self.provider.cfg.timeout + Duration::from_secs(1));
        let claimed = match self.claim(&ids).await {
            Ok(c) => c,
            Err(e) => {
                let why = format!("claim: {e}");
                return chunk
                    .into_iter()
                    .map(|(m, s)| (m, s, Some(Outcome::Transient(None, why.clone()))))
                    .collect();
            }
        };
        let calls = chunk.into_iter().map(|(m, s)| async {
            if !claimed.contains(&m.id) {
                return (m, s, None);
            }
            if claimed_at.elapsed() > latest_start {
                let why = "claimed too long ago to call safely; not called".to_string();
                return (m, s, Some(Outcome::Unknown(why)));
            }
            let outcome = self.provider.send(&m.channel, &m.phone, &m.body).await;
            (m, s, Some(outcome))
        });
        let results = futures::future::join_all(calls).await;
        let sent: Vec<(i64, &str)> = results
            .iter()
            .filter_map(|(m, _, o)| match o {
                Some(Outcome::Sent(sid)) => Some((m.id, sid.as_str())),
                _ => None,
            })
            .collect();
        if let Err(e) = self.mark_sent(&sent).await {
            // Left SENDING: the pump's reconciliation finds them at the provider.
            warn!(error = %e, sends = sent.len(), "recording sends failed; left for reconciliation");
        }
        results
    }

    /// Records sends the provider accepted and links the status callbacks
    /// that beat them, outside the batch transaction: a callback stored
    /// between an in-transaction link and its commit would find no message
    /// and stay parked. Committed first, then linked, so every callback is
    /// linked either here or by the receipts stage.
    async fn mark_sent(&self, sent: &[(i64, &str)]) -> anyhow::Result<()> {
        if sent.is_empty() {
            return Ok(());
        }
        let client = self.pool.get().await?;
        let ids: Vec<i64> = sent.iter().map(|s| s.0).collect();
        let sids: Vec<&str> = sent.iter().map(|s| s.1).collect();
        client.execute(SENT, &[&ids, &sids]).await?;
        client.query_one(APPLY_RECEIPTS, &[&sids]).await?;
        Ok(())
    }

    async fn claim(&self, ids: &[i64]) -> anyhow::Result<HashSet<i64>> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(CLAIM).await?;
        let rows = client.query(&stmt, &[&ids]).await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Waits for the campaign's and the sender number's limiters.
    async fn pace(&self, m: &Msg) {
        let started = Instant::now();
        if let (Some(id), Some(rate)) = (m.campaign, m.rate) {
            self.limits
                .campaign(id, rate.max(1) as u32)
                .until_ready()
                .await;
        }
        if let Some(g) = self.limits.global() {
            g.until_ready().await;
        }
        histogram!("ese_sender_rate_limit_wait_seconds").record(started.elapsed().as_secs_f64());
    }
}

/// Puts held messages that are due back on `sends`, fails held messages of
/// cancelled campaigns, and reconciles messages left SENDING.
pub struct Pump {
    pub pool: Pool,
    pub producer: Producer,
    pub codec: Codec,
    pub provider: Provider,
    pub sends_topic: String,
    pub interval: Duration,
    pub reconcile_after: Duration,
    pub produce_timeout: Duration,
}

const DROP_CANCELLED: &str = "
UPDATE messages m SET status = 'FAILED', failure_reason = 'campaign ' || lower(c.status),
                      parked_until = NULL, updated_at = now()
  FROM campaigns c
 WHERE c.id = m.campaign_id AND m.parked_until IS NOT NULL AND m.status = 'QUEUED'
   AND c.status IN ('CANCELLED', 'COMPLETED')";

const DUE: &str = "
SELECT m.id, m.campaign_id, m.recipient_phone, m.channel, m.body, m.retry_count,
       coalesce(m.send_kind, CASE WHEN m.campaign_id IS NULL THEN 'reply' ELSE 'campaign' END)
  FROM messages m LEFT JOIN campaigns c ON c.id = m.campaign_id
 WHERE m.parked_until <= now() AND m.status = 'QUEUED'
   AND (m.campaign_id IS NULL OR c.status = 'RUNNING')
 ORDER BY m.parked_until LIMIT 5000
 FOR UPDATE OF m SKIP LOCKED";

const UNPARK: &str = "
UPDATE messages SET parked_until = NULL, parked_reason = NULL, send_kind = NULL WHERE id = ANY($1)";

const STUCK: &str = "
SELECT id, recipient_phone, channel, body, claimed_at FROM messages
 WHERE status = 'SENDING' AND claimed_at < now() - make_interval(secs => $1::float8)
 ORDER BY claimed_at LIMIT 100";

impl Pump {
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            if let Err(e) = self.pass().await {
                counter!("ese_sender_pump_errors_total").increment(1);
                warn!(error = %e, "sender pump failed; trying again");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    async fn pass(&self) -> anyhow::Result<()> {
        let mut client = self.pool.get().await?;
        client.execute(DROP_CANCELLED, &[]).await?;
        loop {
            let tx = client.transaction().await?;
            let rows = tx.query(DUE, &[]).await?;
            if rows.is_empty() {
                break;
            }
            let sends: Vec<SendRequest> = rows
                .iter()
                .map(|r| SendRequest {
                    message_id: r.get(0),
                    campaign_id: r.get(1),
                    recipient: r.get(2),
                    channel: r.get(3),
                    body: r.get(4),
                    attempt: r.get(5),
                    kind: r.get(6),
                    not_before: None,
                })
                .collect();
            super::produce_sends(
                &self.producer,
                &self.codec,
                &self.sends_topic,
                &sends,
                self.produce_timeout,
            )
            .await?;
            let ids: Vec<i64> = sends.iter().map(|s| s.message_id).collect();
            tx.execute(UNPARK, &[&ids]).await?;
            tx.commit().await?;
            counter!("ese_sender_released_total").increment(ids.len() as u64);
        }
        self.reconcile(&client).await
    }

    /// Messages left SENDING: SENT if the provider has them, else sent again.
    async fn reconcile(&self, client: &deadpool_postgres::Client) -> anyhow::Result<()> {
        let secs = self.reconcile_after.as_secs_f64();
        for r in client.query(STUCK, &[&secs]).await? {
            let (id, phone, channel, body, claimed): (i64, String, String, String, DateTime<Utc>) =
                (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
            match self.provider.find(&channel, &phone, &body, claimed).await? {
                Some(sid) => {
                    client
                        .execute(
                            "UPDATE messages SET status = 'SENT', provider_sid = $2, sent_at = $3, updated_at = now()
                              WHERE id = $1 AND status = 'SENDING'",
                            &[&id, &sid, &claimed],
                        )
                        .await?;
                    client
                        .query_one(APPLY_RECEIPTS, &[&vec![sid.as_str()]])
                        .await?;
                    counter!("ese_sender_reconciled_total", "outcome" => "sent").increment(1);
                    info!(message = id, sid, "reconciled: the provider has it");
                }
                None => {
                    client
                        .execute(
                            "UPDATE messages SET status = 'QUEUED', claimed_at = NULL, parked_until = now(),
                                    parked_reason = 'reconciled: not at the provider', updated_at = now()
                              WHERE id = $1 AND status = 'SENDING'",
                            &[&id],
                        )
                        .await?;
                    counter!("ese_sender_reconciled_total", "outcome" => "requeued").increment(1);
                    info!(
                        message = id,
                        "reconciled: the provider never got it; sending again"
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_provider_errors() {
        let t = |c, s| matches!(classify(Some(c), s, String::new()), Outcome::Transient(..));
        for code in [20429, 30001, 30003, 30008] {
            assert!(t(code, 400), "{code}");
        }
        for code in [21211, 21408, 21610, 21614, 30004, 30005, 30006, 30007] {
            assert!(!t(code, 400), "{code}");
        }
        assert!(matches!(
            classify(None, 503, String::new()),
            Outcome::Transient(..)
        ));
        assert!(matches!(
            classify(Some(12345), 400, String::new()),
            Outcome::Permanent(..)
        ));
    }

    #[test]
    fn quiet_hours_wrap_midnight_in_local_time() {
        let tz: chrono_tz::Tz = "Europe/Paris".parse().unwrap();
        let start = NaiveTime::from_hms_opt(21, 0, 0).unwrap();
        let end = NaiveTime::from_hms_opt(8, 0, 0).unwrap();
        // 21:30 UTC in winter is 22:30 in Paris: quiet until 08:00 Paris = 07:00 UTC next day.
        let now = Utc.with_ymd_and_hms(2026, 1, 10, 21, 30, 0).unwrap();
        assert_eq!(
            quiet_until(now, tz, start, end),
            Some(Utc.with_ymd_and_hms(2026, 1, 11, 7, 0, 0).unwrap())
        );
        // 03:00 UTC = 04:00 Paris: same morning.
        let now = Utc.with_ymd_and_hms(2026, 1, 11, 3, 0, 0).unwrap();
        assert_eq!(
            quiet_until(now, tz, start, end),
            Some(Utc.with_ymd_and_hms(2026, 1, 11, 7, 0, 0).unwrap())
        );
        // Noon: not quiet.
        let now = Utc.with_ymd_and_hms(2026, 1, 11, 12, 0, 0).unwrap();
        assert_eq!(quiet_until(now, tz, start, end), None);
    }
}
