//! `ese demo`: the whole loop on a running engine (`ese up --with-provider-sim`),
//! driven the way a user would: user profiles on `users.upserts`, then a
//! template, a segment and a campaign through the admin API, started, and
//! watched until every message is final.

use std::time::{Duration, Instant};

use rdkafka::producer::FutureRecord;
use serde_json::{Value, json};

use crate::codec::Codec;
use crate::config::Settings;
use crate::kafka::Producer;
use crate::records::UserUpsert;

struct Admin {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Admin {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| {
            anyhow::anyhow!("{method} {url}: {e} (is `ese up --with-provider-sim` running?)")
        })?;
        let status = resp.status();
        let value: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            anyhow::bail!("{method} {path}: {status}: {value}");
        }
        Ok(value)
    }
}

/// The `id` of a resource the admin API answered with.
fn id_of<'a>(what: &str, resource: &'a serde_json::Value) -> anyhow::Result<&'a str> {
    resource["id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("the admin API answered a {what} without an id: {resource}"))
}

/// Runs the demo with `users` recipients; fails after `timeout`.
pub async fn run(settings: &Settings, users: u32, timeout: Duration) -> anyhow::Result<()> {
    let token = crate::campaigns::api::token_from_env().ok_or_else(|| {
        anyhow::anyhow!(
            "ESE_ADMIN_TOKEN is not set: the demo uses the admin API with the engine's token"
        )
    })?;
    let admin = Admin {
        http: crate::http::client_builder().build()?,
        base: format!("http://{}/api/v1", settings.admin.listen),
        token,
    };
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    println!("ese demo {run}: {users} users → campaign → simulator → DELIVERED");

    // 1. Profiles through the users stage (numbers are the provider's test range).
    let topic = settings
        .pipeline("users")?
        .inputs
        .first()
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("pipelines.users.inputs is empty"))?;
    let codec = Codec::new(&settings.schema_registry)?;
    let producer = Producer::new(&settings.kafka)?;
    let now = chrono::Utc::now().timestamp_millis();
    let mut payloads = Vec::new();
    for i in 0..users {
        let u = UserUpsert {
            consent: None,
            event_id: None,
            phone: format!("+1415{}", 5_000_000 + i),
            attributes: [
                ("first_name".to_string(), json!(format!("Demo{i}"))),
                ("demo".to_string(), json!(run.clone())),
            ]
            .into(),
            occurred_at: now,
        };
        payloads.push((u.phone.clone(), codec.encode(&topic, &u).await?));
    }
    let records = payloads
        .iter()
        .map(|(k, v)| {
            FutureRecord::<[u8], [u8]>::to(&topic)
                .key(k.as_bytes())
                .payload(v.as_slice())
        })
        .collect();
    producer
        .send_all(records, settings.kafka.produce_timeout)
        .await
        .map_err(|e| anyhow::anyhow!("producing demo users on {topic}: {e}"))?;
    println!("  {users} user profiles produced on {topic}");

    // 2. Template, segment (this run's users), campaign.
    use reqwest::Method;
    let template = admin
        .call(
            Method::POST,
            "/templates",
            Some(json!({"name": format!("demo {run}"), "content": "Hi {first_name}, this is the ese demo."})),
        )
        .await?;
    let segment = admin
        .call(
            Method::POST,
            "/segments",
            Some(json!({"name": format!("demo {run}"),
                        "filter_criteria": {"attribute": "demo", "operator": "equals", "value": run}})),
        )
        .await?;
    let deadline = Instant::now() + timeout;
    let sid = id_of("segment", &segment)?;
    loop {
        let e = admin
            .call(Method::GET, &format!("/segments/{sid}/estimate"), None)
            .await?;
        if e["estimated_audience_size"].as_i64() == Some(users as i64) {
            break;
        }
        if Instant::now() > deadline {
            anyhow::bail!("the users stage did not store the demo users in time ({e})");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    println!("  segment {sid}: {users} users");
    let campaign = admin
        .call(
            Method::POST,
            "/campaigns",
            Some(
                json!({"name": format!("demo {run}"), "template_id": template["id"],
                        "segment_id": segment["id"], "rate_limit_per_second": 100,
                        // A demo runs at any hour: no quiet hours.
                        "quiet_hours_start": null, "quiet_hours_end": null}),
            ),
        )
        .await?;
    let id = id_of("campaign", &campaign)?;
    // No schedule_time: ready starts it at once.
    admin
        .call(Method::POST, &format!("/campaigns/{id}/ready"), None)
        .await?;
    println!("  campaign {id} started");

    // 3. Watch the messages reach their final states.
    let bar = indicatif::ProgressBar::new(users as u64).with_style(
        indicatif::ProgressStyle::with_template("  {bar:40} {pos}/{len} final  {msg}")?
            .progress_chars("=> "),
    );
    let counts = loop {
        let c = admin
            .call(Method::GET, &format!("/campaigns/{id}"), None)
            .await?;
        let counts = c["counts"].clone();
        let done: u64 = crate::model::MessageStatus::FINAL
            .iter()
            .map(|s| counts[s.as_str()].as_u64().unwrap_or(0))
            .sum();
        bar.set_position(done);
        bar.set_message(counts.to_string());
        if done >= users as u64 {
            bar.finish();
            break counts;
        }
        if Instant::now() > deadline {
            bar.abandon();
            anyhow::bail!("campaign {id} not finished in {timeout:?}: {counts}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    println!("  campaign {id} messages by status:");
    if let Some(m) = counts.as_object() {
        for (status, n) in m {
            println!("    {status:<12} {n}");
        }
    }
    Ok(())
}
