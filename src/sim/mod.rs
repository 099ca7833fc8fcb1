//! `ese provider-sim`: a Twilio-compatible Messages API simulator, so the
//! sender, the webhook bridge and the receipts stage can be tested and
//! benchmarked end to end without the real provider.
//!
//! It answers `POST/GET /2010-04-01/Accounts/{sid}/Messages.json` and
//! `GET …/Messages/{sid}.json` with Twilio's JSON and error shapes (HTTP Basic
//! auth), rate-limits with a token bucket, and after each accepted send POSTs
//! signed status callbacks (`X-Twilio-Signature`, `I-Twilio-Idempotency-Token`)
//! to `StatusCallback` with configurable latency, jitter, failure mix,
//! duplicates and reordering. Tests script per-recipient outcomes
//! (`POST /sim/script`), clear state (`POST /sim/reset`) and read exact counts
//! (`GET /sim/stats`).

mod bucket;
mod errors;
mod plan;
mod requests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics::counter;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

pub use crate::config::{FailureMix, SimConfig};
use crate::twilio::signature::sign;
use bucket::TokenBucket;
use errors::*;
use plan::*;
use requests::*;

/// The simulator: configuration, credentials, state and the callback client.
pub struct Simulator {
    cfg: SimConfig,
    account_sid: String,
    auth_token: String,
    ledger: Mutex<Ledger>,
    callback_slots: Arc<Semaphore>,
    http: reqwest::Client,
}

impl Simulator {
    pub fn new(
        cfg: SimConfig,
        account_sid: String,
        auth_token: String,
    ) -> anyhow::Result<Arc<Self>> {
        cfg.validate()?;
        if account_sid.is_empty() || auth_token.is_empty() {
            anyhow::bail!(
                "provider-sim needs an account SID and an auth token (TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN)"
            );
        }
        let seed = if cfg.seed == 0 {
            rand::random::<u64>()
        } else {
            cfg.seed
        };
        let http = crate::http::client_builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| anyhow::anyhow!("provider-sim: cannot build the callback client: {e}"))?;
        let ledger = Ledger {
            messages: Vec::new(),
            index: HashMap::new(),
            by_to: HashMap::new(),
            scripts: HashMap::new(),
            windows: HashMap::new(),
            stats: Stats::default(),
            bucket: TokenBucket::new(cfg.rate_limit, cfg.burst, Instant::now()),
            rng: StdRng::seed_from_u64(seed),
            generation: CancellationToken::new(),
        };
        Ok(Arc::new(Self {
            callback_slots: Arc::new(Semaphore::new(cfg.callback_concurrency)),
            cfg,
            account_sid,
            auth_token,
            ledger: Mutex::new(ledger),
            http,
        }))
    }

    /// The API, the test controls under `/sim/`, and `/metrics`.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route(
                "/2010-04-01/Accounts/{account}/Messages.json",
                post(send).get(list),
            )
            .route("/2010-04-01/Accounts/{account}/Messages/{file}", get(fetch))
            .route("/sim/healthz", get(|| std::future::ready("ok")))
            // The controls need the account's credentials, as the API does.
            .merge(
                Router::new()
                    .route("/sim/script", post(script))
                    .route("/sim/reset", post(reset))
                    .route("/sim/stats", get(stats))
                    .route("/sim/inbound", post(inbound))
                    .route_layer(axum::middleware::from_fn_with_state(
                        self.clone(),
                        control_auth,
                    )),
            )
            .with_state(self.clone())
            .merge(crate::metrics::router())
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `headers` carry this account's HTTP basic credentials
    /// (compared in constant time).
    fn credentials_match(&self, headers: &HeaderMap) -> bool {
        use subtle::ConstantTimeEq;
        basic_credentials(headers).is_some_and(|(user, password)| {
            let user = user.as_bytes().ct_eq(self.account_sid.as_bytes());
            let password = password.as_bytes().ct_eq(self.auth_token.as_bytes());
            bool::from(user & password)
        })
    }

    fn authorize(&self, path_account: &str, headers: &HeaderMap) -> Result<(), Box<Response>> {
        if self.credentials_match(headers) && path_account == self.account_sid {
            return Ok(());
        }
        counter!(crate::metrics::names::SIM_REQUESTS_TOTAL, "outcome" => "unauthorized")
            .increment(1);
        let mut r = ApiError::new(20003).into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"Twilio API\""),
        );
        Err(Box::new(r))
    }

    /// Records one authenticated send and schedules its callbacks; returns the
    /// answer and the scripted delay to wait before giving it.
    fn accept(
        self: &Arc<Self>,
        params: &[(String, String)],
    ) -> (Result<Value, ApiError>, Duration) {
        let now = chrono::Utc::now();
        let mut lg = self.ledger();
        lg.stats.total += 1;
        let req = match validate_send(params) {
            Ok(r) => r,
            Err(e) => return (lg.reject(e), Duration::ZERO),
        };
        if !lg.bucket.try_take(Instant::now()) {
            return (lg.reject(ApiError::new(20429)), Duration::ZERO);
        }
        let outcome = match lg.scripts.get_mut(&req.to) {
            Some(queue) => {
                let next = queue.pop_front();
                if queue.is_empty() {
                    lg.scripts.remove(&req.to);
                }
                next.unwrap_or_default()
            }
            None => Outcome::default(),
        };
        let delay = Duration::from_millis(outcome.delay_ms);
        if let Some(code) = outcome.api_error {
            return (lg.reject(ApiError::new(code)), delay);
        }
        // An approved template, rendered as the provider would.
        let body = match &req.content_sid {
            None => req.body.clone(),
            Some(sid) => match self.content(sid, req.content_variables.as_deref()) {
                Ok(body) => body,
                Err(e) => return (lg.reject(e), delay),
            },
        };
        let whatsapp = req.to.starts_with("whatsapp:");
        // Free-form WhatsApp outside the person's window is accepted, then
        // fails (63016), as the provider does.
        let closed = whatsapp
            && req.content_sid.is_none()
            && lg
                .windows
                .get(&req.to)
                .is_none_or(|t| t.elapsed() >= self.cfg.whatsapp_window);
        let fate = match outcome.fate() {
            _ if closed => Fate::Failed {
                status: "failed".into(),
                code: 63016,
            },
            Some(f) => f,
            None if self.cfg.failures.is_empty() => Fate::Delivered,
            None => {
                let u = lg.rng.random::<f64>();
                random_fate(&self.cfg.failures, u)
            }
        };
        let plan = plan_callbacks(&self.cfg, &fate, whatsapp, &mut lg.rng);
        *lg.stats.fates.entry(fate.status().to_string()).or_default() += 1;
        let message = Message {
            sid: new_sid(),
            to: req.to,
            from: req.from,
            messaging_service_sid: req.messaging_service_sid,
            body,
            num_media: req.num_media,
            status: "queued".into(),
            error_code: None,
            created: now,
            updated: now,
            sent: None,
        };
        let answer = message.json(&self.account_sid);
        let target = Target {
            sid: message.sid.clone(),
            to: message.to.clone(),
            from: message.from.clone(),
            messaging_service_sid: message.messaging_service_sid.clone(),
            url: req.status_callback,
        };
        lg.insert(message, now.timestamp());
        let cancel = lg.generation.clone();
        drop(lg);
        counter!(crate::metrics::names::SIM_REQUESTS_TOTAL, "outcome" => "accepted").increment(1);
        self.schedule(target, plan, cancel);
        (Ok(answer), delay)
    }

    /// The text of approved template `sid` with `variables` (a JSON
    /// object of strings), or the provider's error for them.
    fn content(&self, sid: &str, variables: Option<&str>) -> Result<String, ApiError> {
        let template = self
            .cfg
            .content_templates
            .iter()
            .find(|t| t.sid == sid)
            .ok_or_else(|| ApiError::with(21655, format!("The ContentSid {sid} is invalid")))?;
        let vars: serde_json::Map<String, Value> = match variables {
            None => Default::default(),
            Some(text) => serde_json::from_str(text).map_err(|e| {
                ApiError::with(21656, format!("ContentVariables is not a JSON object: {e}"))
            })?,
        };
        template
            .render(&vars)
            .map_err(|why| ApiError::with(21656, why))
    }

    /// A person's message: opens their WhatsApp window and, with
    /// `inbound-url` set, delivers it there signed; whether it was.
    async fn inbound(&self, from: &str, to: &str, body: &str) -> bool {
        self.ledger()
            .windows
            .insert(format!("whatsapp:{from}"), Instant::now());
        if self.cfg.inbound_url.is_empty() {
            return false;
        }
        let sid = new_sid();
        let params: Vec<(String, String)> = [
            ("MessageSid", sid.as_str()),
            ("SmsMessageSid", sid.as_str()),
            ("AccountSid", self.account_sid.as_str()),
            ("From", &format!("whatsapp:{from}")),
            ("To", &format!("whatsapp:{to}")),
            ("Body", body),
            ("NumMedia", "0"),
            ("ApiVersion", crate::twilio::API_VERSION),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let url = self.cfg.inbound_url.clone();
        let signature = sign(&self.auth_token, &url, &params);
        let cancel = self.ledger().generation.clone();
        self.deliver(
            &url,
            &params,
            &signature,
            &uuid::Uuid::new_v4().to_string(),
            &cancel,
        )
        .await
    }

    /// One task per message sleeps until each callback is due, moves the
    /// stored status forward and hands the POST to a bounded delivery task.
    fn schedule(self: &Arc<Self>, target: Target, plan: Vec<Planned>, cancel: CancellationToken) {
        if plan.is_empty() {
            return;
        }
        let sim = self.clone();
        let start = tokio::time::Instant::now();
        tokio::spawn(async move {
            for step in plan {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep_until(start + step.at) => {}
                }
                sim.mark(&target.sid, &step);
                let Some(url) = target.url.clone() else {
                    continue;
                };
                // Acquired here, in firing order (the semaphore is fair).
                let permit = tokio::select! {
                    _ = cancel.cancelled() => return,
                    p = sim.callback_slots.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                };
                let params = callback_params(&sim.account_sid, &target, &step);
                let signature = sign(&sim.auth_token, &url, &params);
                let (sim2, cancel2, token) = (sim.clone(), cancel.clone(), step.token);
                tokio::spawn(async move {
                    let ok = sim2
                        .deliver(&url, &params, &signature, &token, &cancel2)
                        .await;
                    drop(permit);
                    if !cancel2.is_cancelled() {
                        sim2.count_callback(ok);
                    }
                });
            }
        });
    }

    fn mark(&self, sid: &str, step: &Planned) {
        let mut lg = self.ledger();
        let Some(&i) = lg.index.get(sid) else { return };
        let Some(m) = lg.messages.get_mut(i) else {
            return;
        };
        if rank(&step.status) <= rank(&m.status) {
            return;
        }
        let now = chrono::Utc::now();
        m.status = step.status.clone();
        m.updated = now;
        m.error_code = step.error_code;
        if m.sent.is_none() && rank(&step.status) >= 1 {
            m.sent = Some(now);
        }
    }

    /// POSTs one callback, retrying on connection error or non-2xx.
    async fn deliver(
        &self,
        url: &str,
        params: &[(String, String)],
        signature: &str,
        token: &str,
        cancel: &CancellationToken,
    ) -> bool {
        for attempt in 0..=self.cfg.callback_retries {
            if attempt > 0 {
                counter!(crate::metrics::names::SIM_CALLBACKS_TOTAL, "outcome" => "retried")
                    .increment(1);
                let backoff = Duration::from_millis(100u64 << (attempt - 1).min(16));
                tokio::select! {
                    _ = cancel.cancelled() => return false,
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
            let request = self
                .http
                .post(url)
                .header("X-Twilio-Signature", signature)
                .header("I-Twilio-Idempotency-Token", token)
                .form(&params)
                .send();
            let result = tokio::select! {
                _ = cancel.cancelled() => return false,
                r = request => r,
            };
            match result {
                Ok(r) if r.status().is_success() => return true,
                Ok(r) => debug!(url, status = %r.status(), attempt, "status callback refused"),
                Err(e) => debug!(url, error = %e, attempt, "status callback failed"),
            }
        }
        false
    }

    fn count_callback(&self, ok: bool) {
        let mut lg = self.ledger();
        if ok {
            lg.stats.callbacks.sent += 1;
        } else {
            lg.stats.callbacks.failed += 1;
        }
        drop(lg);
        let outcome = if ok { "sent" } else { "failed" };
        counter!(crate::metrics::names::SIM_CALLBACKS_TOTAL, "outcome" => outcome).increment(1);
    }

    fn reset(&self) {
        let mut lg = self.ledger();
        lg.generation.cancel();
        lg.generation = CancellationToken::new();
        lg.messages.clear();
        lg.index.clear();
        lg.by_to.clear();
        lg.scripts.clear();
        lg.windows.clear();
        lg.stats = Stats::default();
        lg.bucket = TokenBucket::new(self.cfg.rate_limit, self.cfg.burst, Instant::now());
    }
}

/// Binds `provider-sim.listen` and serves until `shutdown`.
pub async fn serve(sim: Arc<Simulator>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listen = sim.cfg.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("provider-sim.listen {listen}: cannot bind: {e}"))?;
    serve_on(sim, listener, shutdown).await
}

/// Serves on a bound listener until `shutdown`, then stops pending callbacks.
/// Binds `cfg.listen` and serves the simulator (credentials from the
/// environment) in a task until `shutdown`; returns the bound address.
pub async fn start(
    cfg: SimConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<(
    std::net::SocketAddr,
    tokio::task::JoinHandle<anyhow::Result<()>>,
)> {
    let creds = crate::twilio::Credentials::from_env()?;
    let sim = Simulator::new(cfg.clone(), creds.account_sid, creds.auth_token)?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("provider-sim.listen {}: cannot bind: {e}", cfg.listen))?;
    let addr = listener.local_addr()?;
    Ok((addr, tokio::spawn(serve_on(sim, listener, shutdown))))
}

pub async fn serve_on(
    sim: Arc<Simulator>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "provider simulator listening");
    }
    let result = axum::serve(listener, sim.router())
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(|e| anyhow::anyhow!("provider-sim server: {e}"));
    sim.ledger().generation.cancel();
    result
}

#[cfg(test)]
mod tests {
    use super::plan::*;
    use super::requests::*;
    use super::*;
    use crate::twilio::signature::p;
    use axum::http::StatusCode;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde_json::json;

    fn cfg() -> SimConfig {
        SimConfig {
            jitter: Duration::ZERO,
            ..SimConfig::default()
        }
    }

    #[test]
    fn sid_format() {
        let a = new_sid();
        assert_eq!(a.len(), 34);
        assert!(a.starts_with("SM"));
        assert!(
            a[2..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        );
        assert_ne!(a, new_sid());
    }

    #[test]
    fn to_validation() {
        for ok in [
            "+14155550100",
            "whatsapp:+14155550100",
            "+12345678",
            "+123456789012345",
        ] {
            assert!(valid_to(ok), "{ok}");
        }
        for bad in [
            "",
            "14155550100",
            "+0415555",
            "+1234567",
            "+1234567890123456",
            "+1415abc0100",
            "sms:+14155550100",
            "whatsapp:14155550100",
        ] {
            assert!(!valid_to(bad), "{bad}");
        }
    }

    #[test]
    fn error_json_shape() {
        let (status, body) = error_body(21211, "The 'To' number +1 is not a valid phone number.");
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(
            body,
            json!({
                "code": 21211,
                "message": "The 'To' number +1 is not a valid phone number.",
                "more_info": "https://www.twilio.com/docs/errors/21211",
                "status": 400,
            })
        );
        assert_eq!(error_body(20429, "x").0, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(error_body(20003, "x").1["status"], 401);
        assert_eq!(error_body(20503, "x").0, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn send_validation() {
        fn e(pairs: &[(&str, &str)]) -> Result<(), i32> {
            validate_send(&p(pairs)).map(|_| ()).map_err(|e| e.code)
        }
        assert_eq!(
            e(&[
                ("To", "+14155550100"),
                ("From", "+15005550006"),
                ("Body", "hi")
            ]),
            Ok(())
        );
        assert_eq!(
            e(&[
                ("To", "+14155550100"),
                ("MessagingServiceSid", "MG1"),
                ("MediaUrl", "https://x/y.png")
            ]),
            Ok(())
        );
        assert_eq!(e(&[("From", "+15005550006"), ("Body", "hi")]), Err(21604));
        assert_eq!(
            e(&[("To", "+1"), ("From", "+15005550006"), ("Body", "hi")]),
            Err(21211)
        );
        assert_eq!(e(&[("To", "+14155550100"), ("Body", "hi")]), Err(21603));
        assert_eq!(
            e(&[("To", "+14155550100"), ("From", "+15005550006")]),
            Err(21602)
        );
        assert_eq!(
            e(&[
                ("To", "+14155550100"),
                ("From", "+1500"),
                ("Body", "hi"),
                ("StatusCallback", "nope")
            ]),
            Err(21609)
        );
        let err = validate_send(&p(&[("To", "+1"), ("From", "+15005550006"), ("Body", "x")]));
        assert_eq!(
            err.map(|_| ()).map_err(|e| e.message),
            Err("The 'To' number +1 is not a valid phone number.".to_string())
        );
    }

    #[test]
    fn token_bucket() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 2, t0);
        assert!(b.try_take(t0));
        assert!(b.try_take(t0));
        assert!(!b.try_take(t0));
        assert!(b.try_take(t0 + Duration::from_millis(150)));
        assert!(!b.try_take(t0 + Duration::from_millis(150)));
        // Refill never exceeds the burst.
        let later = t0 + Duration::from_secs(10);
        assert!(b.try_take(later) && b.try_take(later) && !b.try_take(later));
        let mut unlimited = TokenBucket::new(0, 0, t0);
        assert!((0..10_000).all(|_| unlimited.try_take(t0)));
    }

    #[test]
    fn basic_auth() {
        let mut h = HeaderMap::new();
        let v = format!("Basic {}", STANDARD.encode("AC1:secret:x"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&v).expect("header"),
        );
        assert_eq!(
            basic_credentials(&h),
            Some(("AC1".into(), "secret:x".into()))
        );
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert_eq!(basic_credentials(&h), None);
    }

    #[test]
    fn plans_in_order_with_failure_and_reorder() {
        let mut rng = StdRng::seed_from_u64(7);
        let plan = plan_callbacks(&cfg(), &Fate::Delivered, false, &mut rng);
        let statuses: Vec<&str> = plan.iter().map(|p| p.status.as_str()).collect();
        assert_eq!(statuses, ["sent", "delivered"]);
        assert_eq!(plan[0].at, Duration::from_millis(20));

        let failed = Fate::Failed {
            status: "undelivered".into(),
            code: 30003,
        };
        let plan = plan_callbacks(&cfg(), &failed, false, &mut rng);
        assert_eq!(plan[1].status, "undelivered");
        assert_eq!(plan[1].error_code, Some(30003));

        let reorder = SimConfig {
            reorder_rate: 1.0,
            ..cfg()
        };
        let plan = plan_callbacks(&reorder, &Fate::Delivered, false, &mut rng);
        assert_eq!(plan[0].status, "delivered");
        assert!(plan[0].at < plan[1].at);

        let dup = SimConfig {
            duplicate_rate: 1.0,
            ..cfg()
        };
        let plan = plan_callbacks(&dup, &Fate::Delivered, false, &mut rng);
        assert_eq!(plan.len(), 4);
        let sent: Vec<&Planned> = plan.iter().filter(|p| p.status == "sent").collect();
        assert_eq!(sent.len(), 2);
        assert_eq!(sent[0].token, sent[1].token);
    }

    #[test]
    fn outcomes_and_fate() {
        let o: Outcome = serde_json::from_str(r#"{"delivery": "failed", "error_code": 30008}"#)
            .expect("outcome");
        assert!(o.validate().is_ok());
        assert_eq!(
            o.fate(),
            Some(Fate::Failed {
                status: "failed".into(),
                code: 30008
            })
        );
        let o: Outcome = serde_json::from_str(r#"{"api_error": 20429}"#).expect("outcome");
        assert_eq!((o.api_error, o.fate()), (Some(20429), None));
        assert!(serde_json::from_str::<Outcome>(r#"{"nope": 1}"#).is_err());
        let bad: Outcome = serde_json::from_str(r#"{"delivery": "lost"}"#).expect("outcome");
        assert!(bad.validate().is_err());
        let mix = vec![FailureMix {
            code: 30003,
            status: "undelivered".into(),
            rate: 0.25,
        }];
        assert_eq!(
            random_fate(&mix, 0.1),
            Fate::Failed {
                status: "undelivered".into(),
                code: 30003
            }
        );
        assert_eq!(random_fate(&mix, 0.3), Fate::Delivered);
    }

    #[test]
    fn config_validation_and_defaults() {
        let defaults = r#"
listen = "127.0.0.1:8099"
seed = 0
rate-limit = 0
burst = 0
api-latency = "0ms"
sent-after = "20ms"
delivered-after = "100ms"
jitter = "10ms"
callback-statuses = ["sent", "delivered"]
duplicate-rate = 0.0
reorder-rate = 0.0
callback-concurrency = 64
callback-retries = 5
failures = []
content-templates = [{ sid = "HX00000000000000000000000000000001", body = "Hello {{1}}, {{2}}" }]
whatsapp-window = "24h"
inbound-url = ""
"#;
        let c: SimConfig = toml::from_str(defaults).expect("defaults parse");
        assert!(c.validate().is_ok());
        assert_eq!(c.delivered_after, SimConfig::default().delivered_after);
        let bad = SimConfig {
            duplicate_rate: 1.5,
            ..SimConfig::default()
        };
        let msg = bad
            .validate()
            .map_err(|e| e.to_string())
            .err()
            .unwrap_or_default();
        assert!(
            msg.contains("provider-sim.duplicate-rate must be between 0 and 1"),
            "{msg}"
        );
        let bad = SimConfig {
            callback_statuses: vec!["read".into()],
            ..SimConfig::default()
        };
        assert!(bad.validate().is_err());
        let over = FailureMix {
            code: 30003,
            status: "failed".into(),
            rate: 0.6,
        };
        let bad = SimConfig {
            failures: vec![over.clone(), over],
            ..SimConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = SimConfig {
            content_templates: vec![crate::config::ContentTemplate {
                sid: "HXnothex".into(),
                body: "x".into(),
            }],
            ..SimConfig::default()
        };
        assert!(bad.validate().is_err());
    }

    fn whatsapp_send(sim: &Arc<Simulator>, extra: &[(&str, &str)]) -> Result<Value, i32> {
        let mut params = p(&[
            ("To", "whatsapp:+14155550100"),
            ("From", "whatsapp:+15005550006"),
        ]);
        params.extend(p(extra));
        sim.accept(&params).0.map_err(|e| e.code)
    }

    /// The provider's WhatsApp rules: approved templates only by their SID
    /// and with every variable; free-form only inside the person's window
    /// (accepted, then failed with 63016); delivered messages are read.
    #[tokio::test]
    async fn whatsapp_templates_window_and_read() {
        let sim = Simulator::new(cfg(), "AC1".into(), "tok".into()).expect("sim");
        let hx = "HX00000000000000000000000000000001";
        assert_eq!(
            whatsapp_send(
                &sim,
                &[("ContentSid", "HX00000000000000000000000000000002")]
            ),
            Err(21655)
        );
        assert_eq!(
            whatsapp_send(
                &sim,
                &[("ContentSid", hx), ("ContentVariables", r#"{"1": "Ada"}"#)]
            ),
            Err(21656),
            "{{2}} missing"
        );
        assert_eq!(
            whatsapp_send(
                &sim,
                &[("ContentSid", hx), ("ContentVariables", "not json")]
            ),
            Err(21656)
        );
        let sent = whatsapp_send(
            &sim,
            &[
                ("ContentSid", hx),
                ("ContentVariables", r#"{"1": "Ada", "2": "welcome"}"#),
            ],
        )
        .expect("template accepted");
        assert_eq!(sent["body"], "Hello Ada, welcome");
        // Free-form before the person wrote: accepted, planned to fail 63016.
        whatsapp_send(&sim, &[("Body", "hi")]).expect("accepted");
        assert_eq!(sim.ledger().stats.fates.get("failed"), Some(&1));
        sim.inbound("+14155550100", "+15005550006", "hello").await;
        whatsapp_send(&sim, &[("Body", "hi")]).expect("accepted");
        assert_eq!(
            sim.ledger().stats.fates.get("failed"),
            Some(&1),
            "window open"
        );
        assert_eq!(sim.ledger().stats.fates.get("delivered"), Some(&2));

        let mut rng = StdRng::seed_from_u64(7);
        let plan = plan_callbacks(&cfg(), &Fate::Delivered, true, &mut rng);
        let statuses: Vec<&str> = plan.iter().map(|p| p.status.as_str()).collect();
        assert_eq!(statuses, ["sent", "delivered", "read"]);
        let failed = Fate::Failed {
            status: "failed".into(),
            code: 63016,
        };
        let plan = plan_callbacks(&cfg(), &failed, true, &mut rng);
        assert!(plan.iter().all(|p| p.status != "read"));
    }
}
