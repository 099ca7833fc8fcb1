//! WhatsApp as the provider runs it: a campaign goes as approved content
//! (ContentSid + ContentVariables), free-form messages keep to the person's
//! 24-hour window (open, expired, fallback template, no fallback), and the
//! simulator refuses what the provider refuses.

use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Loop, Proc, kill9};

const APPROVED: &str = "HX00000000000000000000000000000001"; // "Hello {{1}}, {{2}}"
const FALLBACK: &str = "HX00000000000000000000000000000002"; // "{{1}}"

const CONFIG: &str = r#"
[provider-sim]
content-templates = [
  { sid = "HX00000000000000000000000000000001", body = "Hello {{1}}, {{2}}" },
  { sid = "HX00000000000000000000000000000002", body = "{{1}}" },
]
"#;

async fn wait_until(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The person writes on WhatsApp: the simulator opens their window and the
/// bridge gets the signed inbound webhook, as from the provider.
async fn person_writes(l: &Loop, from: &str, body: &str) {
    let r = l
        .bridge
        .http
        .post(format!("{}/sim/inbound", l.sim_base))
        .basic_auth(crate::harness::SIM_ACCOUNT, Some(crate::fixtures::TOKEN))
        .json(&json!({"from": from, "body": body}))
        .send()
        .await
        .expect("simulator answers");
    assert_eq!(r.status(), 200);
    let path = "/webhooks/twilio/inbound";
    let sid = format!("SM{}", uuid::Uuid::new_v4().simple());
    let params: Vec<(String, String)> = [
        ("MessageSid", sid.as_str()),
        ("AccountSid", crate::harness::SIM_ACCOUNT),
        ("From", &format!("whatsapp:{from}")),
        ("To", "whatsapp:+15005550006"),
        ("Body", body),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let url = format!("{}{path}", l.app.settings.bridge.public_url);
    let signature = ese::twilio::signature::sign(crate::fixtures::TOKEN, &url, &params);
    let form = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(&params)
        .finish();
    let r = l
        .bridge
        .http
        .post(format!("{}{path}", l.bridge.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-twilio-signature", signature)
        .body(form)
        .send()
        .await
        .expect("bridge answers");
    assert_eq!(r.status(), 200);
}

/// A free-form WhatsApp reply row and its send record; its id.
async fn reply(l: &Loop, to: &str, text: &str) -> uuid::Uuid {
    let c = l.app.pool.get().await.unwrap();
    c.execute(
        "INSERT INTO users (phone_e164) VALUES ($1) ON CONFLICT DO NOTHING",
        &[&to],
    )
    .await
    .unwrap();
    let id: uuid::Uuid = c
        .query_one(
            "INSERT INTO messages (recipient_phone, channel, rendered_content, kind)
             VALUES ($1, 'WHATSAPP', $2, 'reply') RETURNING id",
            &[&to, &text],
        )
        .await
        .unwrap()
        .get(0);
    let send = ese::records::SendRequest {
        message_id: id,
        campaign_id: None,
        recipient: to.to_string(),
        channel: ese::model::Channel::Whatsapp,
        body: text.to_string(),
        attempt: 0,
        kind: ese::model::SendKind::Reply,
        not_before: None,
    };
    let topic = l.app.topic("sends");
    let payload = l.app.codec.encode(&topic, &send).await.unwrap();
    l.app.produce(&topic, to.as_bytes(), &payload).await;
    id
}

async fn status(l: &Loop, id: uuid::Uuid) -> (String, Option<String>, Option<i32>) {
    let c = l.app.pool.get().await.unwrap();
    let r = c
        .query_one(
            "SELECT status, failure_reason, error_code FROM messages WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

async fn wait_final(l: &Loop, id: uuid::Uuid) -> (String, Option<String>, Option<i32>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = status(l, id).await;
        if !matches!(s.0.as_str(), "QUEUED" | "SENDING" | "SENT") {
            return s;
        }
        assert!(Instant::now() < deadline, "message {id} stuck: {s:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the provider holds for `to`: the texts it rendered and sent.
async fn provider_bodies(l: &Loop, to: &str) -> Vec<String> {
    let url = url::Url::parse_with_params(
        &format!(
            "{}/2010-04-01/Accounts/{}/Messages.json",
            l.sim_base,
            crate::harness::SIM_ACCOUNT
        ),
        &[("To", format!("whatsapp:{to}"))],
    )
    .unwrap();
    let page: Value = l
        .bridge
        .http
        .get(url)
        .basic_auth(crate::harness::SIM_ACCOUNT, Some(crate::fixtures::TOKEN))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    page["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["body"].as_str().map(str::to_string))
        .collect()
}

fn sender(l: &Loop, fallback: Option<&str>) -> Child {
    let env: Vec<(&str, String)> = fallback
        .map(|f| ("ESE__SENDER__WHATSAPP_FALLBACK_CONTENT_SID", f.to_string()))
        .into_iter()
        .collect();
    l.app.spawn_ese_piped(&["run", "sender"], &env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whatsapp_campaign_goes_as_approved_content_and_free_form_keeps_to_the_window() {
    let l = Loop::start(CONFIG).await;
    let (ada, bob, cid, dee, eve, fay) = (
        "+14155550301",
        "+14155550302",
        "+14155550303",
        "+14155550304",
        "+14155550305",
        "+14155550306",
    );
    let c = l.app.pool.get().await.unwrap();
    for (phone, name) in [(ada, "Ada"), (bob, "Bob"), (fay, "Fay")] {
        c.execute(
            "INSERT INTO users (phone_e164, attributes) VALUES ($1, jsonb_build_object('plan', 'wa', 'first_name', $2::text))",
            &[&phone, &name],
        )
        .await
        .unwrap();
    }
    let api = &l.api;
    // A WhatsApp template without approved content cannot make a campaign.
    let bare = api
        .expect(
            201,
            "POST",
            "/api/v1/templates",
            Some(json!({"name": "bare", "channel": "WHATSAPP", "content": "Hi {first_name}"})),
        )
        .await;
    let seg = api
        .expect(
            201,
            "POST",
            "/api/v1/segments",
            Some(json!({"name": "wa", "filter_criteria": {"attribute": "plan", "operator": "equals", "value": "wa"}})),
        )
        .await;
    let refused = api
        .expect(
            422,
            "POST",
            "/api/v1/campaigns",
            Some(json!({"name": "bare", "template_id": bare["id"], "segment_id": seg["id"]})),
        )
        .await;
    assert_eq!(refused["error"]["field"], "/template_id", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("content_sid")),
        "{refused}"
    );
    // The approved one: the preview shows the text and what is sent.
    let t = api
        .expect(
            201,
            "POST",
            "/api/v1/templates",
            Some(json!({
                "name": "offer", "channel": "WHATSAPP", "content": "Hi {first_name}, your {plan} offer",
                "content_sid": APPROVED, "content_variables": ["first_name", "plan"]
            })),
        )
        .await;
    assert_eq!(t["content_sid"], APPROVED);
    let preview = api
        .expect(
            200,
            "POST",
            &format!("/api/v1/templates/{}/render", crate::harness::id_of(&t)),
            Some(json!({"variables": {"first_name": "Ada", "plan": "wa"}})),
        )
        .await;
    assert_eq!(preview["rendered_content"], "Hi Ada, your wa offer");
    assert_eq!(
        preview["send"],
        json!({"content_sid": APPROVED, "content_variables": {"1": "Ada", "2": "wa"}})
    );
    let bad = api
        .expect(
            422,
            "POST",
            "/api/v1/templates",
            Some(
                json!({"name": "x", "channel": "WHATSAPP", "content": "x", "content_sid": "HX12"}),
            ),
        )
        .await;
    assert_eq!(bad["error"]["field"], "/content_sid");

    let stages: Vec<_> = ["fanout", "normalize", "receipts", "consent"]
        .into_iter()
        .map(|s| l.app.start_stage(s))
        .collect();
    let mut child = Proc::new(sender(&l, None));
    // Fay is not on WhatsApp: the provider says so in her callback.
    l.script(
        &format!("whatsapp:{fay}"),
        json!([{"delivery": "undelivered", "error_code": 63003}]),
    )
    .await;
    let campaign = api
        .expect(
            201,
            "POST",
            "/api/v1/campaigns",
            Some(json!({"name": "offer", "template_id": t["id"], "segment_id": seg["id"], "rate_limit_per_second": 100,
                        "quiet_hours_start": null, "quiet_hours_end": null})),
        )
        .await;
    let id = crate::harness::id_of(&campaign);
    // Without a schedule_time, ready starts it at once.
    api.expect(200, "POST", &format!("/api/v1/campaigns/{id}/ready"), None)
        .await;
    // Sent as approved content (nobody wrote first, so free-form would
    // fail): delivered, then read; Fay's undelivered, and she is marked
    // unreachable on WhatsApp.
    wait_until("two read, one undelivered", Duration::from_secs(90), async || {
        l.app
            .count("SELECT count(*) FROM messages WHERE campaign_id IS NOT NULL AND status = 'READ'")
            .await
            == 2
            && l
                .app
                .count("SELECT count(*) FROM messages WHERE status = 'UNDELIVERED' AND error_code = 63003")
                .await
                == 1
    })
    .await;
    assert_eq!(
        l.app
            .count(&format!(
                "SELECT count(*) FROM user_channels WHERE phone_number = '{fay}' AND channel = 'WHATSAPP' AND unreachable_code = 63003"
            ))
            .await,
        1
    );
    let row = c
        .query_one(
            "SELECT rendered_content, content_sid, content_variables FROM messages WHERE recipient_phone = $1",
            &[&ada],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, String>(0),
        "Hi Ada, your wa offer",
        "the text, for the audit trail"
    );
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some(APPROVED));
    assert_eq!(
        row.get::<_, Option<Value>>(2),
        Some(json!({"1": "Ada", "2": "wa"}))
    );
    assert_eq!(provider_bodies(&l, ada).await, ["Hello Ada, wa"]);

    // Free-form: Bob wrote, so a reply goes; Cid wrote 25 hours ago and
    // Dee never did: FAILED with the reason, no call.
    person_writes(&l, bob, "thanks!").await;
    wait_until("Bob's window recorded", Duration::from_secs(60), async || {
        l.app
            .count(&format!(
                "SELECT count(*) FROM user_channels WHERE phone_number = '{bob}' AND channel = 'WHATSAPP' AND last_inbound_at IS NOT NULL"
            ))
            .await
            == 1
    })
    .await;
    c.execute(
        "INSERT INTO user_channels (phone_number, channel, last_inbound_at) VALUES ($1, 'WHATSAPP', now() - interval '25 hours')",
        &[&cid],
    )
    .await
    .unwrap();
    // Segments see the channel: Bob's window is open, Fay is unreachable.
    for (filter, want) in [
        (json!({"channel": "WHATSAPP", "operator": "window_open"}), 1),
        (json!({"channel": "WHATSAPP", "operator": "reachable"}), 2),
        (
            json!({"channel": "WHATSAPP", "operator": "last_inbound_after", "value": "2020-01-01"}),
            1,
        ),
        (
            json!({"operator": "NOT", "conditions": [{"channel": "SMS", "operator": "window_open"}]}),
            3,
        ),
    ] {
        let seg = api
            .expect(
                201,
                "POST",
                "/api/v1/segments",
                Some(json!({"name": format!("channel {filter}"), "filter_criteria": filter})),
            )
            .await;
        let est = api
            .expect(
                200,
                "GET",
                &format!("/api/v1/segments/{}/estimate", crate::harness::id_of(&seg)),
                None,
            )
            .await;
        assert_eq!(est["estimated_audience_size"], want, "{filter}");
    }
    let bad = api
        .expect(
            422,
            "POST",
            "/api/v1/segments",
            Some(json!({"name": "bad", "filter_criteria": {"channel": "FAX", "operator": "window_open"}})),
        )
        .await;
    assert_eq!(bad["error"]["field"], "/filter_criteria/channel", "{bad}");
    let to_bob = reply(&l, bob, "You're welcome").await;
    let to_cid = reply(&l, cid, "Late answer").await;
    let to_dee = reply(&l, dee, "Unasked").await;
    let (s, ..) = wait_final(&l, to_bob).await;
    assert!(matches!(s.as_str(), "DELIVERED" | "READ"), "{s}");
    assert_eq!(
        provider_bodies(&l, bob).await.first().map(String::as_str),
        Some("You're welcome")
    );
    for id in [to_cid, to_dee] {
        let (s, why, _) = wait_final(&l, id).await;
        assert_eq!(s, "FAILED");
        assert!(
            why.as_deref().is_some_and(|w| w.contains("24-hour window")),
            "{why:?}"
        );
    }
    assert!(provider_bodies(&l, cid).await.is_empty(), "no call for Cid");
    assert!(provider_bodies(&l, dee).await.is_empty(), "no call for Dee");

    // With a fallback template, Eve (no window) gets the text inside it.
    kill9(child.child());
    child = Proc::new(sender(&l, Some(FALLBACK)));
    let to_eve = reply(&l, eve, "Your order shipped").await;
    let (s, ..) = wait_final(&l, to_eve).await;
    assert!(matches!(s.as_str(), "DELIVERED" | "READ"), "{s}");
    assert_eq!(provider_bodies(&l, eve).await, ["Your order shipped"]);
    drop(child);
    for s in stages {
        s.stop().await;
    }
}

/// A WhatsApp campaign at 100/s from a sender limited to 10/s on WhatsApp
/// (burst 1): the provider sees 10/s, never a whole second above 11.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whatsapp_sends_keep_to_the_senders_channel_limit() {
    let l = Loop::start(&format!(
        "{CONFIG}\n[sender]\nwhatsapp-rate-limit = 10\nburst = 1\n"
    ))
    .await;
    const N: i64 = 40;
    l.app
        .seed_users(
            N,
            "jsonb_build_object('plan', 'wa', 'first_name', 'U' || i)",
        )
        .await;
    let api = &l.api;
    let t = api
        .expect(
            201,
            "POST",
            "/api/v1/templates",
            Some(json!({
                "name": "limited", "channel": "WHATSAPP", "content": "Hi {first_name}",
                "content_sid": APPROVED, "content_variables": ["first_name", "plan"]
            })),
        )
        .await;
    let seg = api
        .expect(
            201,
            "POST",
            "/api/v1/segments",
            Some(json!({"name": "wa", "filter_criteria": {"attribute": "plan", "operator": "equals", "value": "wa"}})),
        )
        .await;
    let stages: Vec<_> = ["fanout", "normalize", "receipts"]
        .into_iter()
        .map(|s| l.app.start_stage(s))
        .collect();
    let _sender = Proc::new(sender(&l, None));
    let c = api
        .expect(
            201,
            "POST",
            "/api/v1/campaigns",
            Some(json!({"name": "limited", "template_id": t["id"], "segment_id": seg["id"], "rate_limit_per_second": 100,
                        "quiet_hours_start": null, "quiet_hours_end": null})),
        )
        .await;
    let id = crate::harness::id_of(&c);
    // Without a schedule_time, ready starts it at once.
    api.expect(200, "POST", &format!("/api/v1/campaigns/{id}/ready"), None)
        .await;
    wait_until("every send made", Duration::from_secs(60), async || {
        l.stats().await["accepted"].as_i64().unwrap_or(0) >= N
    })
    .await;
    let stats = l.stats().await;
    let seconds: std::collections::BTreeMap<i64, u64> =
        serde_json::from_value(stats["per_second"].clone()).unwrap();
    let span = seconds.keys().last().unwrap() - seconds.keys().next().unwrap() + 1;
    assert!(
        span >= 4,
        "40 sends at 10/s take at least 4 seconds, not {span}: {seconds:?}"
    );
    assert!(
        seconds.values().all(|n| *n <= 11),
        "no second above the limit plus the burst: {seconds:?}"
    );
    for s in stages {
        s.stop().await;
    }
}

/// `consent.stop-scope = "channel"`: a STOP on WhatsApp stops WhatsApp
/// alone (the person's overall state and SMS stay opted in), the decision
/// says its channel on `consent.changes`, and a START there opens it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_scoped_to_its_channel_stops_that_channel_alone() {
    let l = Loop::start(&format!("{CONFIG}\n[consent]\nstop-scope = \"channel\"\n")).await;
    let ada = "+14155550321";
    let c = l.app.pool.get().await.unwrap();
    c.execute(
        "INSERT INTO users (phone_e164, attributes) VALUES ($1, '{\"plan\": \"both\", \"first_name\": \"Ada\"}')",
        &[&ada],
    )
    .await
    .unwrap();
    let stages: Vec<_> = ["fanout", "normalize", "receipts", "consent"]
        .into_iter()
        .map(|s| l.app.start_stage(s))
        .collect();
    let child = Proc::new(sender(&l, None));
    let channel_state = async |channel: &str| -> Option<String> {
        c.query_opt(
            "SELECT consent_state FROM user_channels WHERE phone_number = $1 AND channel = $2",
            &[&ada, &channel],
        )
        .await
        .unwrap()
        .and_then(|r| r.get(0))
    };

    person_writes(&l, ada, "STOP").await;
    l.app
        .wait_for_count(
            "SELECT count(*) FROM consent_events WHERE channel = 'WHATSAPP' AND new_state = 'OPT_OUT' AND applied",
            1,
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(channel_state("WHATSAPP").await.as_deref(), Some("OPT_OUT"));
    assert_eq!(
        channel_state("SMS").await,
        None,
        "SMS follows the overall state"
    );
    let overall: String = c
        .query_one(
            "SELECT consent_state FROM users WHERE phone_e164 = $1",
            &[&ada],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        overall, "OPT_IN",
        "the person's overall consent is untouched"
    );
    let changes = l
        .app
        .read_topic(&l.app.topic("consent.changes"), 1, Duration::from_secs(20));
    assert_eq!(changes.len(), 1);
    let change: ese::records::ConsentChange = l
        .app
        .codec
        .decode(changes[0].payload.as_deref().unwrap())
        .await
        .unwrap();
    assert_eq!(change.channel, Some(ese::model::Channel::Whatsapp));
    assert_eq!(change.state, ese::model::ConsentState::OptOut);

    // The same audience on both channels: SMS reaches her, WhatsApp does not.
    let api = &l.api;
    let seg = api
        .expect(
            201,
            "POST",
            "/api/v1/segments",
            Some(json!({"name": "both", "filter_criteria": {"attribute": "plan", "operator": "equals", "value": "both"}})),
        )
        .await;
    let mut campaigns = Vec::new();
    for (name, template) in [
        ("sms", json!({"name": "sms", "content": "Hi {first_name}"})),
        (
            "wa",
            json!({"name": "wa", "channel": "WHATSAPP", "content": "Hi {first_name}, your {plan} offer",
                   "content_sid": APPROVED, "content_variables": ["first_name", "plan"]}),
        ),
    ] {
        let t = api
            .expect(201, "POST", "/api/v1/templates", Some(template))
            .await;
        let campaign = api
            .expect(
                201,
                "POST",
                "/api/v1/campaigns",
                Some(json!({"name": name, "template_id": t["id"], "segment_id": seg["id"], "rate_limit_per_second": 100,
                        "quiet_hours_start": null, "quiet_hours_end": null})),
            )
            .await;
        let id = crate::harness::id_of(&campaign);
        // Without a schedule_time, ready starts it at once.
        api.expect(200, "POST", &format!("/api/v1/campaigns/{id}/ready"), None)
            .await;
        campaigns.push(id);
    }
    l.app
        .wait_for_count(
            "SELECT count(*) FROM fanout_progress WHERE finished",
            2,
            Duration::from_secs(60),
        )
        .await;
    let sent = async |campaign: uuid::Uuid| {
        l.app
            .count(&format!(
                "SELECT count(*) FROM messages WHERE campaign_id = '{campaign}' AND recipient_phone = '{ada}'"
            ))
            .await
    };
    assert_eq!(sent(campaigns[0]).await, 1, "SMS still reaches her");
    assert_eq!(sent(campaigns[1]).await, 0, "WhatsApp does not");

    // START on WhatsApp opens that channel again.
    person_writes(&l, ada, "START").await;
    l.app
        .wait_for_count(
            "SELECT count(*) FROM user_channels WHERE channel = 'WHATSAPP' AND consent_state = 'OPT_IN'",
            1,
            Duration::from_secs(60),
        )
        .await;
    drop(child);
    for s in stages {
        s.stop().await;
    }
}
