//! Consent and receipts: users' consent and messages' status stay true
//! whatever order events arrive in, and replays change nothing.

use std::time::Duration;

use chrono::{DateTime, Utc};
use ese::records::{ConsentChange, Param, SendRequest, WebhookRaw};

use crate::harness::TestApp;

const T0: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
const WAIT: Duration = Duration::from_secs(60);

fn raw(kind: &str, params: &[(&str, &str)], at: i64) -> WebhookRaw {
    WebhookRaw {
        event_id: uuid::Uuid::new_v4().to_string(),
        kind: kind.into(),
        path: format!("/webhooks/twilio/{kind}"),
        query: String::new(),
        params: params
            .iter()
            .map(|(n, v)| Param {
                name: n.to_string(),
                value: v.to_string(),
            })
            .collect(),
        body: None,
        content_type: "application/x-www-form-urlencoded".into(),
        received_at: at,
    }
}

fn status(sid: &str, status: &str, error: Option<&str>, at: i64) -> WebhookRaw {
    let mut p = vec![
        ("MessageSid", sid),
        ("MessageStatus", status),
        ("To", "+14155552671"),
        ("From", "+14155550123"),
    ];
    if let Some(e) = error {
        p.push(("ErrorCode", e));
    }
    raw("status", &p, at)
}

pub(crate) fn inbound(from: &str, body: &str, at: i64) -> WebhookRaw {
    let sid = format!("SM{}", uuid::Uuid::new_v4().simple());
    raw(
        "inbound",
        &[
            ("MessageSid", &sid),
            ("From", from),
            ("To", "+14155550123"),
            ("Body", body),
        ],
        at,
    )
}

pub(crate) async fn publish(app: &TestApp, records: &[&WebhookRaw]) {
    for r in records {
        let (topic, key) = match r.kind.as_str() {
            "status" => (
                app.topic("webhooks.status.raw"),
                r.param("MessageSid").unwrap().to_string(),
            ),
            _ => (
                app.topic("webhooks.inbound.raw"),
                r.param("From").unwrap().to_string(),
            ),
        };
        let payload = app.codec.encode(&topic, *r).await.unwrap();
        app.produce(&topic, key.as_bytes(), &payload).await;
    }
}

/// A template, segment and campaign, and one message per (phone, sid, status).
async fn campaign(app: &TestApp, messages: &[(&str, Option<&str>, &str)]) -> uuid::Uuid {
    let c = app.pool.get().await.unwrap();
    c.batch_execute(
        "INSERT INTO templates (name, content) VALUES ('t', 'Hello {name}');
         INSERT INTO segments (name, filter_criteria) VALUES ('s', '{}');
         INSERT INTO campaigns (name, template_id, segment_id, status) SELECT 'c', t.id, s.id, 'RUNNING' FROM templates t, segments s;",
    )
    .await
    .unwrap();
    let id: uuid::Uuid = c
        .query_one("SELECT id FROM campaigns", &[])
        .await
        .unwrap()
        .get(0);
    for (phone, sid, st) in messages {
        c.execute(
            "INSERT INTO users (phone_e164) VALUES ($1) ON CONFLICT DO NOTHING",
            &[phone],
        )
        .await
        .unwrap();
        c.execute(
            "INSERT INTO messages (campaign_id, recipient_phone, rendered_content, provider_sid, status) VALUES ($1, $2, 'Hello', $3, $4)",
            &[&id, phone, sid, st],
        )
        .await
        .unwrap();
    }
    id
}

fn at(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_status_never_moves_backwards() {
    let app = TestApp::spawn().await;
    campaign(
        &app,
        &[
            ("+14155550001", Some("SMa"), "SENT"),
            ("+14155550002", Some("SMb"), "SENT"),
            ("+14155550003", Some("SMc"), "SENT"),
        ],
    )
    .await;
    let normalize = app.start_stage("normalize");
    let receipts = app.start_stage("receipts");

    // Delivered before sent; failed with 30003; one callback three times.
    let twice = status("SMc", "delivered", None, T0 + 1_000);
    publish(
        &app,
        &[
            &status("SMa", "delivered", None, T0 + 2_000),
            &status("SMa", "sent", None, T0 + 3_000),
            &status("SMb", "failed", Some("30003"), T0 + 2_000),
            &twice,
        ],
    )
    .await;
    app.wait_caught_up("normalize", WAIT).await;
    app.wait_caught_up("receipts", WAIT).await;
    let c = app.pool.get().await.unwrap();
    let updated_once: DateTime<Utc> = c
        .query_one(
            "SELECT updated_at FROM messages WHERE provider_sid = 'SMc'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    publish(&app, &[&twice, &twice]).await;
    app.wait_caught_up("normalize", WAIT).await;
    app.wait_caught_up("receipts", WAIT).await;

    let row = c
        .query_one(
            "SELECT status, sent_at, delivered_at FROM messages WHERE provider_sid = 'SMa'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "DELIVERED");
    let sent: Option<DateTime<Utc>> = row.get(1);
    let delivered: Option<DateTime<Utc>> = row.get(2);
    assert_eq!(delivered, Some(at(T0 + 2_000)));
    assert!(
        sent.is_some_and(|s| s <= at(T0 + 2_000)),
        "sent_at set, not after delivered_at: {sent:?}"
    );

    let row = c
        .query_one(
            "SELECT status, error_code FROM messages WHERE provider_sid = 'SMb'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "FAILED");
    assert_eq!(row.get::<_, Option<i32>>(1), Some(30003));

    let row = c
        .query_one(
            "SELECT status, updated_at FROM messages WHERE provider_sid = 'SMc'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "DELIVERED");
    assert_eq!(
        row.get::<_, DateTime<Utc>>(1),
        updated_once,
        "duplicates changed nothing"
    );
    assert_eq!(
        app.count("SELECT count(*) FROM delivery_receipts WHERE message_sid = 'SMc'")
            .await,
        1
    );
    assert_eq!(
        app.count("SELECT count(*) FROM receipts_unmatched").await,
        0
    );

    // A late `sent` after `delivered`, and `read`, keep the machine moving forward only.
    publish(
        &app,
        &[
            &status("SMc", "sent", None, T0 + 5_000),
            &status("SMc", "read", None, T0 + 6_000),
        ],
    )
    .await;
    app.wait_caught_up("normalize", WAIT).await;
    app.wait_caught_up("receipts", WAIT).await;
    let row = c
        .query_one(
            "SELECT status, read_at FROM messages WHERE provider_sid = 'SMc'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "READ");
    assert_eq!(row.get::<_, Option<DateTime<Utc>>>(1), Some(at(T0 + 6_000)));
    normalize.stop().await;
    receipts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_that_beats_the_sid_is_parked_then_applied() {
    let app = TestApp::spawn().await;
    campaign(&app, &[("+14155550001", None, "SENDING")]).await;
    let normalize = app.start_stage("normalize");
    let receipts = app.start_stage("receipts");
    publish(&app, &[&status("SMlate", "delivered", None, T0 + 2_000)]).await;
    app.wait_caught_up("normalize", WAIT).await;
    app.wait_caught_up("receipts", WAIT).await;
    assert_eq!(
        app.count("SELECT count(*) FROM messages WHERE status = 'SENDING'")
            .await,
        1
    );
    assert_eq!(
        app.count("SELECT count(*) FROM receipts_unmatched").await,
        1,
        "parked"
    );

    // What the sender does when the provider answers: write the SID, apply parked receipts.
    let mut c = app.pool.get().await.unwrap();
    let tx = c.transaction().await.unwrap();
    tx.execute(
        "UPDATE messages SET provider_sid = 'SMlate', status = 'SENT', sent_at = $1",
        &[&at(T0 + 1_000)],
    )
    .await
    .unwrap();
    tx.query("SELECT * FROM ese_apply_receipts(ARRAY['SMlate'])", &[])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let row = c
        .query_one("SELECT status, sent_at, delivered_at FROM messages", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "DELIVERED");
    assert_eq!(row.get::<_, Option<DateTime<Utc>>>(1), Some(at(T0 + 1_000)));
    assert_eq!(row.get::<_, Option<DateTime<Utc>>>(2), Some(at(T0 + 2_000)));
    assert_eq!(
        app.count("SELECT count(*) FROM receipts_unmatched").await,
        0
    );
    normalize.stop().await;
    receipts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_consent_decision_stands_whatever_the_arrival_order() {
    let app = TestApp::spawn().await;
    let normalize = app.start_stage("normalize");
    let consent = app.start_stage("consent");
    let ada = "+14155550101";
    let bob = "+14155550102";
    // START (t=20) arrives before the older STOP (t=10).
    publish(
        &app,
        &[
            &inbound(ada, "start", T0 + 20_000),
            &inbound(ada, "  Stop!! ", T0 + 10_000),
        ],
    )
    .await;
    // Bob: an ordinary message, two that merely mention a keyword (UNCLEAR:
    // no change, one clarification), HELP, then STOP.
    publish(
        &app,
        &[
            &inbound(bob, "hello", T0 + 1_000),
            &inbound(bob, "I'll stop by tomorrow", T0 + 2_000),
            &inbound(bob, "Can I cancel my order?", T0 + 2_500),
            &inbound(bob, "help", T0 + 3_000),
            &inbound(bob, "STOP.", T0 + 4_000),
            &inbound(bob, "help", T0 + 5_000),
        ],
    )
    .await;
    app.wait_caught_up("normalize", WAIT).await;
    app.wait_caught_up("consent", WAIT).await;

    let c = app.pool.get().await.unwrap();
    let row = c
        .query_one("SELECT consent_state, consent_updated_at, last_message_received FROM users WHERE phone_e164 = $1", &[&ada])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "OPT_IN", "the later START stands");
    assert_eq!(
        row.get::<_, Option<DateTime<Utc>>>(1),
        Some(at(T0 + 20_000))
    );
    assert_eq!(
        row.get::<_, Option<DateTime<Utc>>>(2),
        Some(at(T0 + 20_000))
    );
    // Interaction figures: messages received, whatever the arrival order.
    for (phone, sent) in [(ada, 2), (bob, 6)] {
        let n: i32 = c
            .query_one(
                "SELECT messages_received FROM users WHERE phone_e164 = $1",
                &[&phone],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, sent, "{phone}");
    }
    let history: Vec<(String, bool)> = c
        .query(
            "SELECT new_state, applied FROM consent_events WHERE phone_number = $1 ORDER BY occurred_at",
            &[&ada],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        history,
        [("OPT_OUT".to_string(), false), ("OPT_IN".to_string(), true)]
    );

    let state: String = c
        .query_one(
            "SELECT consent_state FROM users WHERE phone_e164 = $1",
            &[&bob],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "OPT_OUT");
    assert_eq!(
        app.count("SELECT count(*) FROM inbound_events WHERE processing_status = 'PROCESSED'")
            .await,
        8
    );
    // The mentions are kept, never applied.
    let unclear: Vec<(Option<String>, String, bool)> = c
        .query(
            "SELECT keyword, source, applied FROM consent_events
              WHERE phone_number = $1 AND new_state = 'UNCLEAR' ORDER BY occurred_at",
            &[&bob],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        unclear,
        [
            (Some("STOP".to_string()), "keyword".to_string(), false),
            (Some("CANCEL".to_string()), "keyword".to_string(), false)
        ]
    );

    // Replies: Ada's opt-in confirmation, Bob's one clarification, his first
    // help and his opt-out confirmation; nothing for ordinary messages,
    // nothing after the opt-out.
    let sends = app.read_topic(&app.topic("sends"), 4, Duration::from_secs(20));
    let mut got: Vec<(String, String)> = Vec::new();
    for s in &sends {
        let r: SendRequest = app
            .codec
            .decode(s.payload.as_deref().unwrap())
            .await
            .unwrap();
        got.push((r.recipient, r.kind.to_string()));
    }
    got.sort();
    assert_eq!(
        got,
        [
            (ada.to_string(), "reply".to_string()),
            (bob.to_string(), "clarification".to_string()),
            (bob.to_string(), "opt_out_confirmation".to_string()),
            (bob.to_string(), "reply".to_string()),
        ]
    );
    // The kinds are the rows', where the sender reads them.
    let kinds: Vec<(String, String)> = c
        .query(
            "SELECT recipient_phone, kind FROM messages WHERE campaign_id IS NULL ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(kinds, got);

    let changes = app.read_topic(&app.topic("consent.changes"), 2, Duration::from_secs(20));
    let mut states: Vec<(String, String)> = Vec::new();
    for ch in &changes {
        let r: ConsentChange = app
            .codec
            .decode(ch.payload.as_deref().unwrap())
            .await
            .unwrap();
        states.push((r.phone, r.state.to_string()));
    }
    states.sort();
    assert_eq!(
        states,
        [
            (ada.to_string(), "OPT_IN".to_string()),
            (bob.to_string(), "OPT_OUT".to_string())
        ]
    );
    normalize.stop().await;
    consent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_performance_counts_and_replay_changes_nothing() {
    let app = TestApp::spawn().await;
    let mut msgs = Vec::new();
    let phones: Vec<String> = (0..10)
        .map(|i| format!("+1415555{:04}", 2000 + i))
        .collect();
    let sids: Vec<String> = (0..10).map(|i| format!("SMperf{i}")).collect();
    for i in 0..10 {
        msgs.push((phones[i].as_str(), Some(sids[i].as_str()), "SENT"));
    }
    let id = campaign(&app, &msgs).await;
    let mut records = Vec::new();
    for (i, sid) in sids.iter().enumerate() {
        let (st, err) = match i {
            0..=4 => ("delivered", None),
            5 | 6 => ("undelivered", Some("30003")),
            7 => ("failed", Some("30008")),
            _ => ("sent", None),
        };
        records.push(status(sid, "sent", None, T0 + 500));
        records.push(status(sid, st, err, T0 + 1_000 + i as i64));
    }
    records.push(inbound(&phones[0], "STOP", T0 + 9_000));
    records.push(inbound(&phones[1], "HELP", T0 + 9_000));
    let refs: Vec<&WebhookRaw> = records.iter().collect();
    publish(&app, &refs).await;
    let stages: Vec<_> = ["normalize", "receipts", "consent"]
        .iter()
        .map(|s| app.start_stage(s))
        .collect();
    for s in ["normalize", "receipts", "consent"] {
        app.wait_caught_up(s, WAIT).await;
    }
    let c = app.pool.get().await.unwrap();
    let perf = ese::reports::campaign_performance(&c, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            perf.total,
            perf.sent,
            perf.delivered,
            perf.undelivered,
            perf.failed,
            perf.queued
        ),
        (10, 2, 5, 2, 1, 0)
    );
    assert_eq!(perf.delivery_rate_pct, 50.0);
    for s in stages {
        s.stop().await;
    }

    // Replay every stage from earliest: fresh groups read everything again.
    let before = app.dump().await;
    let mut deps = app.deps();
    for p in deps.settings.pipelines.values_mut() {
        p.group_id = format!("{}.replay", p.group_id);
    }
    let token = tokio_util::sync::CancellationToken::new();
    let mut handles = Vec::new();
    for s in ["normalize", "receipts", "consent"] {
        let (d, t) = (deps.clone(), token.clone());
        handles.push(tokio::spawn(async move { ese::stages::run(s, d, t).await }));
    }
    for s in ["normalize", "receipts", "consent"] {
        app.wait_group_caught_up(s, ".replay", WAIT).await;
    }
    token.cancel();
    for h in handles {
        h.await.unwrap().unwrap();
    }
    let after = app.dump().await;
    assert_eq!(before, after, "replay left every table as it was");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_and_a_start_at_the_same_time_leave_the_number_opted_out() {
    let app = TestApp::spawn().await;
    let normalize = app.start_stage("normalize");
    let consent = app.start_stage("consent");
    let (carl, dan) = ("+14155550103", "+14155550104");
    let t = T0 + 7_000;
    // Same event time, both orders on the topic.
    publish(
        &app,
        &[
            &inbound(carl, "START", t),
            &inbound(carl, "STOP", t),
            &inbound(dan, "STOP", t),
            &inbound(dan, "START", t),
        ],
    )
    .await;
    app.wait_caught_up("normalize", WAIT).await;
    app.wait_caught_up("consent", WAIT).await;
    let c = app.pool.get().await.unwrap();
    for phone in [carl, dan] {
        let state: String = c
            .query_one(
                "SELECT consent_state FROM users WHERE phone_e164 = $1",
                &[&phone],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(state, "OPT_OUT", "{phone}: a tie goes to stopping");
        let events: i64 = c
            .query_one(
                "SELECT count(*) FROM consent_events WHERE phone_number = $1",
                &[&phone],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(events, 2, "{phone}: both decisions recorded");
    }
    normalize.stop().await;
    consent.stop().await;
}

/// A profile upsert, consent stated or not.
async fn profile(app: &TestApp, phone: &str, consent: Option<&str>, at: i64) {
    let u = ese::records::UserUpsert {
        event_id: None,
        phone: phone.to_string(),
        attributes: Default::default(),
        occurred_at: at,
        consent: consent.map(str::to_string),
    };
    let topic = app.topic("users.upserts");
    let payload = app.codec.encode(&topic, &u).await.unwrap();
    app.produce(&topic, phone.as_bytes(), &payload).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_number_first_seen_in_a_message_is_in_no_audience_until_it_opts_in() {
    let app = TestApp::spawn().await;
    let normalize = app.start_stage("normalize");
    let consent = app.start_stage("consent");
    let users = app.start_stage("users");
    let api = app.start_api().await;
    let (carol, dave, erin, frank) = (
        "+14155550103",
        "+14155550104",
        "+14155550105",
        "+14155550106",
    );
    // Carol writes first; Dave's profile states nothing; Erin's says OPT_OUT;
    // Frank's says something that is not a consent.
    publish(&app, &[&inbound(carol, "hello, who is this?", T0)]).await;
    app.wait_caught_up("normalize", WAIT).await;
    app.wait_caught_up("consent", WAIT).await;
    profile(&app, dave, None, T0).await;
    profile(&app, erin, Some("OPT_OUT"), T0).await;
    profile(&app, frank, Some("MAYBE"), T0).await;
    // A profile for Carol that states nothing leaves her UNKNOWN.
    profile(&app, carol, None, T0 + 1_000).await;
    app.wait_caught_up("users", WAIT).await;
    let state = |phone: &'static str| {
        let app = &app;
        async move {
            let c = app.pool.get().await.unwrap();
            c.query_opt(
                "SELECT consent_state FROM users WHERE phone_e164 = $1",
                &[&phone],
            )
            .await
            .unwrap()
            .map(|r| r.get::<_, String>(0))
        }
    };
    assert_eq!(state(carol).await.as_deref(), Some("UNKNOWN"));
    assert_eq!(
        state(dave).await.as_deref(),
        Some("OPT_IN"),
        "the data model's default"
    );
    assert_eq!(
        state(erin).await.as_deref(),
        Some("OPT_OUT"),
        "stated consent"
    );
    assert_eq!(state(frank).await, None, "a bad consent value is refused");
    let dlq = app.read_topic(&app.topic("dlq.users"), 1, Duration::from_secs(20));
    assert_eq!(dlq.len(), 1);
    let reason = dlq[0].header("ese.error").unwrap_or_default();
    assert!(
        reason.contains("\"MAYBE\"") && reason.contains("OPT_IN"),
        "{reason}"
    );
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM consent_events WHERE phone_number = '{erin}' AND source = 'profile' AND applied"
        ))
        .await,
        1
    );

    // Everyone's segment: Dave only, until Carol says START.
    let seg = api
        .expect(
            201,
            "POST",
            "/api/v1/segments",
            Some(serde_json::json!({"name": "everyone", "filter_criteria": {"attribute": "x", "operator": "not_exists"}})),
        )
        .await;
    let estimate = format!("/api/v1/segments/{}/estimate", crate::harness::id_of(&seg));
    assert_eq!(
        api.expect(200, "GET", &estimate, None).await["estimated_audience_size"],
        1,
        "UNKNOWN and OPT_OUT are in no audience"
    );
    publish(&app, &[&inbound(carol, "START", T0 + 2_000)]).await;
    app.wait_caught_up("normalize", WAIT).await;
    app.wait_caught_up("consent", WAIT).await;
    assert_eq!(state(carol).await.as_deref(), Some("OPT_IN"));
    assert_eq!(
        api.expect(200, "GET", &estimate, None).await["estimated_audience_size"],
        2
    );
    let old: Option<String> = app
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT old_state FROM consent_events WHERE phone_number = $1 AND new_state = 'OPT_IN'",
            &[&carol],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(old.as_deref(), Some("UNKNOWN"));
    normalize.stop().await;
    consent.stop().await;
    users.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unclear_mention_is_clarified_once_per_interval_and_not_when_off() {
    for clarify in [true, false] {
        let mut extra = toml::Table::new();
        extra.insert("consent".into(), toml::toml! { clarify = clarify }.into());
        let app = TestApp::spawn_with(extra).await;
        let normalize = app.start_stage("normalize");
        let consent = app.start_stage("consent");
        let (gil, hal) = ("+14155550107", "+14155550108");
        // Gil mentions a keyword three times, in separate batches; Hal,
        // opted out, once.
        publish(&app, &[&inbound(hal, "STOP", T0)]).await;
        for (i, body) in [
            "Can I cancel my order?",
            "I'll stop by tomorrow",
            "when does the sale end",
        ]
        .iter()
        .enumerate()
        {
            publish(&app, &[&inbound(gil, body, T0 + 1_000 * (i as i64 + 1))]).await;
            app.wait_caught_up("normalize", WAIT).await;
            app.wait_caught_up("consent", WAIT).await;
        }
        publish(
            &app,
            &[&inbound(
                hal,
                "please cancel my order today thanks",
                T0 + 5_000,
            )],
        )
        .await;
        app.wait_caught_up("normalize", WAIT).await;
        app.wait_caught_up("consent", WAIT).await;
        let clarifications = app
            .count("SELECT count(*) FROM messages WHERE kind = 'clarification'")
            .await;
        assert_eq!(
            clarifications,
            i64::from(clarify),
            "clarify = {clarify}: one for Gil, none for opted-out Hal"
        );
        assert_eq!(
            app.count(
                "SELECT count(*) FROM consent_events WHERE new_state = 'UNCLEAR' AND NOT applied"
            )
            .await,
            4,
            "every mention is kept"
        );
        assert_eq!(
            app.count(&format!(
                "SELECT count(*) FROM users WHERE phone_e164 = '{gil}' AND consent_state = 'UNKNOWN'"
            ))
            .await,
            1,
            "mentions change nothing"
        );
        normalize.stop().await;
        consent.stop().await;
    }
}

/// Channel decisions (`consent.stop-scope = "channel"`) and overall ones
/// apply by event time, whatever the order they arrive in: a channel
/// decision older than the overall one changes nothing, an overall one
/// replaces the older channel decisions, a newer channel one stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_and_overall_consent_apply_by_event_time() {
    use ese::db::calls::{ConsentDecision, apply_consent};
    use ese::model::{Channel, ConsentState};
    let app = TestApp::spawn().await;
    let eve = "+14155550105";
    let mut c = app.pool.get().await.unwrap();
    let mut n = 0;
    let mut decide = async |channel: Option<Channel>, state: ConsentState, ms: i64| {
        n += 1;
        let tx = c.transaction().await.unwrap();
        let event = format!("test-{n}");
        apply_consent(
            &tx,
            [ConsentDecision {
                phone: eve,
                channel,
                state,
                at: at(T0 + ms),
                source: "keyword",
                keyword: None,
                event_id: &event,
            }],
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
    };
    // A new number's START on WhatsApp: WhatsApp only; overall UNKNOWN.
    decide(Some(Channel::Whatsapp), ConsentState::OptIn, 10_000).await;
    let states = async || -> (String, String, String) {
        let c = app.pool.get().await.unwrap();
        let r = c
            .query_one(
                "SELECT consent_state, ese_consent_on(phone_e164, 'SMS', consent_state),
                        ese_consent_on(phone_e164, 'WHATSAPP', consent_state)
                   FROM users WHERE phone_e164 = $1",
                &[&eve],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    let s = |a: &str, b: &str, w: &str| (a.to_string(), b.to_string(), w.to_string());
    assert_eq!(states().await, s("UNKNOWN", "UNKNOWN", "OPT_IN"));
    // An overall STOP, newer: every channel stops.
    decide(None, ConsentState::OptOut, 20_000).await;
    assert_eq!(states().await, s("OPT_OUT", "OPT_OUT", "OPT_OUT"));
    // A channel START older than it arrives late: nothing changes.
    decide(Some(Channel::Whatsapp), ConsentState::OptIn, 15_000).await;
    assert_eq!(states().await, s("OPT_OUT", "OPT_OUT", "OPT_OUT"));
    // A newer channel START: that channel alone.
    decide(Some(Channel::Whatsapp), ConsentState::OptIn, 30_000).await;
    assert_eq!(states().await, s("OPT_OUT", "OPT_OUT", "OPT_IN"));
    // An overall START between the two: applied, the newer channel
    // decision stays.
    decide(None, ConsentState::OptIn, 25_000).await;
    assert_eq!(states().await, s("OPT_IN", "OPT_IN", "OPT_IN"));
    let kept = app
        .count("SELECT count(*) FROM user_channels WHERE channel = 'WHATSAPP' AND consent_state = 'OPT_IN'")
        .await;
    assert_eq!(kept, 1, "WhatsApp's own decision (30 s) is newer");
    // STOP on SMS alone.
    decide(Some(Channel::Sms), ConsentState::OptOut, 35_000).await;
    assert_eq!(states().await, s("OPT_IN", "OPT_OUT", "OPT_IN"));
    // An overall STOP at 32 s, arriving last: replaces WhatsApp's decision
    // (30 s), not SMS's (35 s).
    decide(None, ConsentState::OptOut, 32_000).await;
    assert_eq!(states().await, s("OPT_OUT", "OPT_OUT", "OPT_OUT"));
    let left: Vec<(String, String)> = app
        .pool
        .get()
        .await
        .unwrap()
        .query(
            "SELECT channel, consent_state FROM user_channels WHERE consent_state IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(left, [("SMS".to_string(), "OPT_OUT".to_string())]);
    let unapplied = app
        .count("SELECT count(*) FROM consent_events WHERE NOT applied")
        .await;
    assert_eq!(
        unapplied, 1,
        "only the late WhatsApp START (15 s) was not applied"
    );
}
