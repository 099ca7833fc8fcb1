//! The lifecycle the data model states, enforced: what deleting a template,
//! segment or campaign does, the message state machine in the database, the
//! immutable audit trail, and a person's interaction figures.

use serde_json::json;

use crate::harness::TestApp;

/// A template, a segment and a campaign in `status` using them; the ids.
async fn campaign_in(
    app: &TestApp,
    name: &str,
    status: &str,
) -> (uuid::Uuid, uuid::Uuid, uuid::Uuid) {
    let c = app.pool.get().await.unwrap();
    let r = c
        .query_one(
            "WITH t AS (INSERT INTO templates (name, content) VALUES ($1, 'Hi') RETURNING id),
                  s AS (INSERT INTO segments (name, filter_criteria)
                        VALUES ($1, '{\"attribute\": \"x\", \"operator\": \"exists\"}') RETURNING id)
             INSERT INTO campaigns (name, template_id, segment_id, status)
             SELECT $1, t.id, s.id, $2 FROM t, s RETURNING template_id, segment_id, id",
            &[&name, &status],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

#[tokio::test]
async fn deleting_follows_the_model_active_campaigns_hold_their_content_finished_ones_keep_history()
{
    let app = TestApp::spawn().await;
    let api = app.start_api().await;
    let c = app.pool.get().await.unwrap();
    c.execute(
        "INSERT INTO users (phone_e164) VALUES ('+14155550001')",
        &[],
    )
    .await
    .unwrap();

    // In use by an active campaign: 409 for the template, segment and campaign.
    for status in ["READY", "RUNNING", "PAUSED"] {
        let (t, s, id) = campaign_in(&app, &format!("active {status}"), status).await;
        for path in [
            format!("/api/v1/templates/{t}"),
            format!("/api/v1/segments/{s}"),
            format!("/api/v1/campaigns/{id}"),
        ] {
            let (code, err) = api.call("DELETE", &path, None).await;
            assert_eq!(code, 409, "{status} {path}: {err}");
            assert_eq!(err["error"]["code"], "in_use", "{err}");
        }
    }

    // A finished campaign keeps its row and its messages' text when its
    // template and segment go; deleting it removes its messages.
    let (t, s, done) = campaign_in(&app, "done", "COMPLETED").await;
    c.execute(
        "INSERT INTO messages (campaign_id, recipient_phone, rendered_content, status)
         VALUES ($1, '+14155550001', 'Hi Ada', 'DELIVERED')",
        &[&done],
    )
    .await
    .unwrap();
    api.expect(204, "DELETE", &format!("/api/v1/templates/{t}"), None)
        .await;
    api.expect(204, "DELETE", &format!("/api/v1/segments/{s}"), None)
        .await;
    let kept = api
        .expect(200, "GET", &format!("/api/v1/campaigns/{done}"), None)
        .await;
    assert_eq!(kept["template_id"], json!(null), "{kept}");
    assert_eq!(kept["segment_id"], json!(null), "{kept}");
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM messages WHERE campaign_id = '{done}' AND rendered_content = 'Hi Ada'"
        ))
        .await,
        1
    );
    api.expect(204, "DELETE", &format!("/api/v1/campaigns/{done}"), None)
        .await;
    api.expect(404, "GET", &format!("/api/v1/campaigns/{done}"), None)
        .await;
    assert_eq!(
        app.count(&format!(
            "SELECT count(*) FROM messages WHERE campaign_id = '{done}'"
        ))
        .await,
        0,
        "its messages went with it"
    );

    // A draft whose template was deleted cannot become READY.
    let (t, _, draft) = campaign_in(&app, "draft", "DRAFT").await;
    api.expect(204, "DELETE", &format!("/api/v1/templates/{t}"), None)
        .await;
    let (code, err) = api
        .call("POST", &format!("/api/v1/campaigns/{draft}/ready"), None)
        .await;
    assert_eq!(code, 409, "{err}");
    assert_eq!(err["error"]["code"], "incomplete", "{err}");
    api.expect(204, "DELETE", &format!("/api/v1/campaigns/{draft}"), None)
        .await;
    api.expect(404, "DELETE", &format!("/api/v1/campaigns/{draft}"), None)
        .await;
}

#[tokio::test]
async fn the_database_refuses_a_status_change_the_message_state_machine_does_not_allow() {
    let app = TestApp::spawn().await;
    let c = app.pool.get().await.unwrap();
    c.execute(
        "INSERT INTO users (phone_e164) VALUES ('+14155550001')",
        &[],
    )
    .await
    .unwrap();
    // (from, to, allowed)
    let cases = [
        ("QUEUED", "SENDING", true),
        ("SENDING", "SENT", true),
        ("SENT", "DELIVERED", true),
        ("DELIVERED", "READ", true),
        ("QUEUED", "FAILED", true),
        ("SENT", "FAILED", true),
        // Deliberate: a claimed message not sent is queued for its retry.
        ("SENDING", "QUEUED", true),
        // Deliberate: the provider's later word wins over the engine's.
        ("FAILED", "DELIVERED", true),
        ("UNDELIVERED", "DELIVERED", true),
        ("DELIVERED", "SENT", false),
        ("SENT", "QUEUED", false),
        ("FAILED", "QUEUED", false),
        ("DELIVERED", "UNDELIVERED", false),
        ("READ", "DELIVERED", false),
        ("DELIVERED", "FAILED", false),
    ];
    for (i, (from, to, allowed)) in cases.into_iter().enumerate() {
        let id: uuid::Uuid = c
            .query_one(
                "INSERT INTO messages (recipient_phone, rendered_content, status, idempotency_key)
                 VALUES ('+14155550001', 'x', $1, $2) RETURNING id",
                &[&from, &format!("case {i}")],
            )
            .await
            .unwrap()
            .get(0);
        let result = c
            .execute("UPDATE messages SET status = $2 WHERE id = $1", &[&id, &to])
            .await;
        match (allowed, result) {
            (true, Ok(1)) => {}
            (false, Err(e)) => {
                let message = e.as_db_error().map(|d| d.message()).unwrap_or_default();
                assert_eq!(e.code().map(|c| c.code()), Some("23514"), "{e:?}");
                assert!(message.contains(&format!("{from} -> {to}")), "{message}");
            }
            (allowed, other) => panic!("{from} -> {to}: allowed {allowed}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn the_audit_trail_refuses_change_and_deletion_except_by_retention() {
    let app = TestApp::spawn().await;
    let c = app.pool.get().await.unwrap();
    c.batch_execute(
        "INSERT INTO delivery_receipts (event_id, message_sid, message_status, raw_payload)
         VALUES (gen_random_uuid(), 'SM1', 'delivered', '{}');
         INSERT INTO inbound_events (event_id, message_sid, from_phone, body, raw_payload)
         VALUES (gen_random_uuid(), 'SM2', '+14155550001', 'hi', '{}');",
    )
    .await
    .unwrap();
    for sql in [
        "UPDATE delivery_receipts SET message_status = 'failed'",
        "DELETE FROM delivery_receipts",
        "UPDATE inbound_events SET body = 'changed'",
        "DELETE FROM inbound_events",
        "TRUNCATE delivery_receipts",
        "TRUNCATE inbound_events",
    ] {
        let e = c.execute(sql, &[]).await.unwrap_err();
        let message = e.as_db_error().map(|d| d.message()).unwrap_or_default();
        assert!(message.contains("audit trail"), "{sql}: {e:?}");
    }
    // An inbound event's processing state moves on.
    c.execute(
        "UPDATE inbound_events SET processing_status = 'PROCESSED', processed_at = now()",
        &[],
    )
    .await
    .unwrap();
    // Retention deletes.
    c.batch_execute(
        "BEGIN; SET LOCAL ese.retention = 'on';
         DELETE FROM delivery_receipts; DELETE FROM inbound_events; COMMIT;",
    )
    .await
    .unwrap();
    assert_eq!(app.count("SELECT count(*) FROM delivery_receipts").await, 0);
    assert_eq!(app.count("SELECT count(*) FROM inbound_events").await, 0);
}

#[tokio::test]
async fn a_delivered_message_is_the_persons_last_delivered() {
    let app = TestApp::spawn().await;
    let c = app.pool.get().await.unwrap();
    c.batch_execute(
        "INSERT INTO users (phone_e164) VALUES ('+14155550001');
         INSERT INTO messages (recipient_phone, rendered_content, status, provider_sid, sent_at, idempotency_key)
         VALUES ('+14155550001', 'x', 'SENT', 'SMa', '2026-01-01T10:00:00Z', 'a'),
                ('+14155550001', 'y', 'SENT', 'SMb', '2026-01-01T11:00:00Z', 'b');
         INSERT INTO delivery_receipts (event_id, message_sid, message_status, raw_payload, received_at)
         VALUES (gen_random_uuid(), 'SMb', 'delivered', '{}', '2026-01-01T11:00:05Z'),
                (gen_random_uuid(), 'SMa', 'delivered', '{}', '2026-01-01T10:00:05Z');",
    )
    .await
    .unwrap();
    // The later delivery first, then the earlier: the later one stands.
    for sid in ["SMb", "SMa"] {
        c.query("SELECT * FROM ese_apply_receipts(ARRAY[$1])", &[&sid])
            .await
            .unwrap();
    }
    let at: String = c
        .query_one(
            "SELECT to_char(last_message_delivered AT TIME ZONE 'UTC', 'HH24:MI:SS') FROM users",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(at, "11:00:05");
}

#[tokio::test]
async fn segments_filter_on_interaction_figures() {
    let app = TestApp::spawn().await;
    let api = app.start_api().await;
    let c = app.pool.get().await.unwrap();
    c.batch_execute(
        "INSERT INTO users (phone_e164, messages_received, last_message_received, last_message_delivered)
         VALUES ('+14155550001', 0, NULL, NULL),
                ('+14155550002', 3, '2026-01-10T00:00:00Z', '2026-01-11T00:00:00Z'),
                ('+14155550003', 7, '2026-02-10T00:00:00Z', NULL);",
    )
    .await
    .unwrap();
    for (i, (filter, want)) in [
        (
            json!({"figure": "messages_received", "operator": "gte", "value": 3}),
            2,
        ),
        (
            json!({"figure": "messages_received", "operator": "equals", "value": 0}),
            1,
        ),
        (
            json!({"figure": "last_message_received", "operator": "after", "value": "2026-02-01"}),
            1,
        ),
        (
            json!({"figure": "last_message_delivered", "operator": "exists"}),
            1,
        ),
        (
            json!({"operator": "NOT", "conditions": [
                {"figure": "last_message_received", "operator": "before", "value": "2026-02-01"}]}),
            2,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let s = api
            .expect(
                201,
                "POST",
                "/api/v1/segments",
                Some(json!({"name": format!("figure {i}"), "filter_criteria": filter})),
            )
            .await;
        assert_eq!(s["estimated_audience_size"], want, "{filter}: {s}");
    }
    let (code, err) = api
        .call(
            "POST",
            "/api/v1/segments",
            Some(json!({"name": "bad", "filter_criteria":
                {"figure": "messages_received", "operator": "after", "value": "2026-01-01"}})),
        )
        .await;
    assert_eq!(code, 422, "{err}");
    assert_eq!(err["error"]["field"], "/filter_criteria/operator", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_keeps_audience_estimates_current() {
    let app =
        TestApp::spawn_with(toml::from_str("[campaigns]\nestimate-interval = \"2s\"").unwrap())
            .await;
    let c = app.pool.get().await.unwrap();
    let id: uuid::Uuid = c
        .query_one(
            "INSERT INTO segments (name, filter_criteria)
             VALUES ('pro', '{\"attribute\": \"plan\", \"operator\": \"equals\", \"value\": \"pro\"}')
             RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    app.seed_users(30, "'{\"plan\": \"pro\"}'::jsonb").await;
    let scheduler = app.start_stage("scheduler");
    let size = format!("SELECT estimated_audience_size::bigint FROM segments WHERE id = '{id}'");
    app.wait_for_count(&size, 30, std::time::Duration::from_secs(20))
        .await;
    // The audience grows; the estimate follows within the interval.
    c.execute(
        "INSERT INTO users (phone_e164, attributes) VALUES ('+14155559999', '{\"plan\": \"pro\"}')",
        &[],
    )
    .await
    .unwrap();
    app.wait_for_count(&size, 31, std::time::Duration::from_secs(20))
        .await;
    scheduler.stop().await;
}

/// Receipts (several statuses) and inbound events received at `at` (SQL).
async fn audit_rows(app: &TestApp, tag: &str, at: &str) {
    let c = app.pool.get().await.unwrap();
    c.batch_execute(&format!(
        "INSERT INTO delivery_receipts (event_id, message_sid, message_status, raw_payload, received_at)
         SELECT gen_random_uuid(), '{tag}' || s, s, '{{}}', {at}
           FROM unnest(ARRAY['sent', 'delivered', 'failed']) s;
         INSERT INTO inbound_events (event_id, message_sid, from_phone, body, raw_payload, received_at)
         SELECT gen_random_uuid(), '{tag}' || i, '+14155550001', 'hi', '{{}}', {at}
           FROM generate_series(1, 2) i;"
    ))
    .await
    .unwrap();
}

const AUDIT_ROWS: &str = "SELECT (SELECT count(*) FROM delivery_receipts WHERE message_sid LIKE $$TAG%$$)
                               + (SELECT count(*) FROM inbound_events WHERE message_sid LIKE $$TAG%$$)";

fn audit_count(tag: &str) -> String {
    AUDIT_ROWS.replace("TAG", tag)
}

#[tokio::test]
async fn retention_deletes_audit_rows_seven_years_old_and_keeps_the_rest() {
    let app = TestApp::spawn().await;
    audit_rows(&app, "old", "'2019-06-01T00:00:00Z'").await;
    audit_rows(&app, "mid", "'2023-06-01T00:00:00Z'").await;
    audit_rows(&app, "new", "now()").await;

    // The clock moved to 2027: what was received in 2019 has expired.
    let as_of = ["--as-of", "2027-01-01T00:00:00Z"];
    let (ok, out, err) = app
        .run_ese(&[&["retention", "--dry-run"][..], &as_of].concat())
        .await;
    assert!(ok, "{err}");
    assert!(
        out.lines()
            .any(|l| l.contains("delivery_receipts") && l.contains(" 3 rows expired")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.contains("inbound_events") && l.contains(" 2 rows expired")),
        "{out}"
    );
    assert_eq!(
        app.count(&audit_count("old")).await,
        5,
        "a dry run deletes nothing"
    );

    // Batches of two: several short transactions per table.
    let env = [("ESE__RETENTION__BATCH_SIZE", "2".to_string())];
    let (ok, out, err) = app
        .run_ese_with(&[&["retention"][..], &as_of].concat(), &env)
        .await;
    assert!(ok, "{err}");
    assert!(out.contains(" 3 rows deleted"), "{out}");
    assert_eq!(app.count(&audit_count("old")).await, 0);
    assert_eq!(app.count(&audit_count("mid")).await, 5);
    assert_eq!(app.count(&audit_count("new")).await, 5);

    // 2031: the 2023 rows too; today's stay.
    let (ok, _, err) = app
        .run_ese(&["retention", "--as-of", "2031-01-01T00:00:00Z"])
        .await;
    assert!(ok, "{err}");
    assert_eq!(app.count(&audit_count("mid")).await, 0);
    assert_eq!(app.count(&audit_count("new")).await, 5);

    let (ok, _, err) = app.run_ese(&["retention", "--as-of", "next year"]).await;
    assert!(!ok);
    assert!(err.contains("--as-of") && err.contains("RFC 3339"), "{err}");
}

#[tokio::test]
async fn the_scheduler_deletes_expired_audit_rows_on_its_own() {
    let app = TestApp::spawn_with(
        toml::from_str("[retention]\naudit = \"1h\"\ninterval = \"1s\"\nbatch-size = 2").unwrap(),
    )
    .await;
    audit_rows(&app, "old", "now() - interval '2 hours'").await;
    audit_rows(&app, "new", "now() - interval '10 minutes'").await;
    let scheduler = app.start_stage("scheduler");
    app.wait_for_count(&audit_count("old"), 0, std::time::Duration::from_secs(20))
        .await;
    assert_eq!(app.count(&audit_count("new")).await, 5);
    scheduler.stop().await;
}
