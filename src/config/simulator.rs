//! `[provider-sim]`: how the Twilio-compatible simulator behaves.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Statuses `callback-statuses` may list; failures come from `failures`.
const CONFIG_STATUSES: &[&str] = &["queued", "sent", "delivered"];
/// `HX` and 32 hexadecimal digits, as the Content API names templates.
pub fn is_content_sid(s: &str) -> bool {
    s.len() == 34 && s.starts_with("HX") && s[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

/// Upper bound of every configured latency, so deadlines cannot overflow.
pub const MAX_LATENCY: Duration = Duration::from_secs(3600);

/// `[provider-sim]`: how the simulator behaves.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SimConfig {
    /// Address the API listens on. Default `127.0.0.1:8099`.
    pub listen: std::net::SocketAddr,
    /// Seed of the one RNG behind every random choice; 0 = from entropy. Default 0.
    pub seed: u64,
    /// Sends per second accepted (token bucket); 0 = unlimited. Default 0.
    pub rate_limit: u32,
    /// Token bucket size when rate-limited; 0 = one second's worth. Default 0.
    pub burst: u32,
    /// Added before answering a send. Default 0ms.
    #[serde(with = "humantime_serde")]
    pub api_latency: Duration,
    /// When the `sent` callback fires, from the send. Default 20ms.
    #[serde(with = "humantime_serde")]
    pub sent_after: Duration,
    /// When the final (`delivered`/`undelivered`/`failed`) callback fires. Default 100ms.
    #[serde(with = "humantime_serde")]
    pub delivered_after: Duration,
    /// ± uniform jitter on every callback time. Default 10ms.
    #[serde(with = "humantime_serde")]
    pub jitter: Duration,
    /// Callbacks of a delivered message, in order (`queued`, `sent`, `delivered`).
    /// Default `["sent", "delivered"]`.
    pub callback_statuses: Vec<String>,
    /// Probability that a callback is sent twice (same token and params). Default 0.
    pub duplicate_rate: f64,
    /// Probability that the last status is sent before the one before it. Default 0.
    pub reorder_rate: f64,
    /// Callback POSTs in flight at most. Default 64.
    pub callback_concurrency: usize,
    /// Retries of a callback on connection error or non-2xx (backoff 100ms·2^n). Default 5.
    pub callback_retries: u32,
    /// Random failure outcomes by error code. Default empty.
    pub failures: Vec<FailureMix>,
    /// Approved WhatsApp content templates (the Content API's): a send
    /// naming another `ContentSid` gets 21655, `ContentVariables` that are
    /// not a JSON object of strings or miss a placeholder 21656. Default
    /// one, `HX00000000000000000000000000000001`, "Hello {{1}}, {{2}}".
    pub content_templates: Vec<ContentTemplate>,
    /// How long after a person's last message (`POST /sim/inbound`)
    /// free-form WhatsApp messages are delivered; outside it they fail with
    /// 63016, as WhatsApp's customer-service window. Default 24h.
    #[serde(with = "humantime_serde")]
    pub whatsapp_window: Duration,
    /// Where `POST /sim/inbound` delivers a person's message as a signed
    /// inbound webhook (the bridge's `/webhooks/twilio/inbound`); empty:
    /// nowhere (the window opens all the same). Default empty.
    pub inbound_url: String,
}

/// One approved content template: its SID and text, `{{1}}`, `{{2}}`… the
/// numbered variables.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ContentTemplate {
    pub sid: String,
    pub body: String,
}

impl ContentTemplate {
    /// The highest `{{N}}` of the body (variables are numbered from 1).
    pub fn variables(&self) -> usize {
        let mut max = 0;
        let mut rest = self.body.as_str();
        while let Some(i) = rest.find("{{") {
            rest = &rest[i + 2..];
            if let Some(j) = rest.find("}}")
                && let Ok(n) = rest[..j].trim().parse::<usize>()
            {
                max = max.max(n);
            }
        }
        max
    }

    /// The body with `vars` (`{"1": "Ada"}`) in place of its placeholders;
    /// the error names what is missing.
    pub fn render(
        &self,
        vars: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, String> {
        let mut out = self.body.clone();
        for n in 1..=self.variables() {
            let key = n.to_string();
            let value = vars.get(&key).and_then(|v| v.as_str()).ok_or_else(|| {
                format!(
                    "ContentVariables has no string for {{{{{n}}}}} of {}",
                    self.sid
                )
            })?;
            out = out.replace(&format!("{{{{{n}}}}}"), value);
        }
        Ok(out)
    }
}

/// One failure outcome: this share of sends ends `status` with `code`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FailureMix {
    pub code: i32,
    /// `undelivered` or `failed`.
    pub status: String,
    pub rate: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 8099)),
            seed: 0,
            rate_limit: 0,
            burst: 0,
            api_latency: Duration::ZERO,
            sent_after: Duration::from_millis(20),
            delivered_after: Duration::from_millis(100),
            jitter: Duration::from_millis(10),
            callback_statuses: vec!["sent".into(), "delivered".into()],
            duplicate_rate: 0.0,
            reorder_rate: 0.0,
            callback_concurrency: 64,
            callback_retries: 5,
            failures: Vec::new(),
            content_templates: vec![ContentTemplate {
                sid: "HX00000000000000000000000000000001".into(),
                body: "Hello {{1}}, {{2}}".into(),
            }],
            whatsapp_window: Duration::from_secs(24 * 3600),
            inbound_url: String::new(),
        }
    }
}

impl SimConfig {
    /// Checks ranges and names; errors name the key.
    pub fn validate(&self) -> anyhow::Result<()> {
        for (key, rate) in [
            ("duplicate-rate", self.duplicate_rate),
            ("reorder-rate", self.reorder_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                anyhow::bail!("provider-sim.{key} must be between 0 and 1 (got {rate})");
            }
        }
        for (key, d) in [
            ("api-latency", self.api_latency),
            ("sent-after", self.sent_after),
            ("delivered-after", self.delivered_after),
            ("jitter", self.jitter),
        ] {
            if d > MAX_LATENCY {
                anyhow::bail!("provider-sim.{key} must be at most 1h");
            }
        }
        for s in &self.callback_statuses {
            if !CONFIG_STATUSES.contains(&s.as_str()) {
                anyhow::bail!(
                    "provider-sim.callback-statuses: unknown status {s:?} (known: queued, sent, delivered)"
                );
            }
        }
        if !(1..=65_536).contains(&self.callback_concurrency) {
            anyhow::bail!("provider-sim.callback-concurrency must be between 1 and 65536");
        }
        let mut sum = 0.0;
        for (i, f) in self.failures.iter().enumerate() {
            if !matches!(f.status.as_str(), "undelivered" | "failed") {
                anyhow::bail!(
                    "provider-sim.failures[{i}].status must be \"undelivered\" or \"failed\" (got {:?})",
                    f.status
                );
            }
            if !(0.0..=1.0).contains(&f.rate) {
                anyhow::bail!("provider-sim.failures[{i}].rate must be between 0 and 1");
            }
            if f.code <= 0 {
                anyhow::bail!("provider-sim.failures[{i}].code must be a positive error code");
            }
            sum += f.rate;
        }
        if sum > 1.0 + 1e-9 {
            anyhow::bail!("provider-sim.failures rates sum to {sum}, more than 1");
        }
        for (i, t) in self.content_templates.iter().enumerate() {
            if !is_content_sid(&t.sid) {
                anyhow::bail!(
                    "provider-sim.content-templates[{i}].sid {:?} is not a ContentSid (HX and 32 hex digits)",
                    t.sid
                );
            }
        }
        if !self.inbound_url.is_empty()
            && !url::Url::parse(&self.inbound_url)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
        {
            anyhow::bail!(
                "provider-sim.inbound-url {:?} is not an http(s) URL",
                self.inbound_url
            );
        }
        Ok(())
    }
}
