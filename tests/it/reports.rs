//! The data model's query patterns: verbatim on a populated database, with
//! the right answers and through the indexes meant for them; and the admin
//! API's reports served from them.

use serde_json::json;

use crate::harness::TestApp;

/// 20,000 people, 2,000 campaigns two days apart (the newest today) of 20
/// messages each, one `delivered` receipt for three messages in four
/// (message j after 1 + j % 10 minutes), inbound messages within and
/// before the last hour.
async fn populate(app: &TestApp) {
    let c = app.pool.get().await.unwrap();
    c.batch_execute(
        "INSERT INTO users (phone_e164, attributes, consent_state)
         SELECT '+1415' || lpad(i::text, 7, '0'),
                jsonb_build_object('city', CASE WHEN i % 100 = 0 THEN 'San Francisco' ELSE 'City ' || (i % 50) END,
                                   'tier', CASE WHEN i % 3 = 0 THEN 'premium' ELSE 'basic' END),
                CASE WHEN i % 7 = 0 THEN 'OPT_OUT' ELSE 'OPT_IN' END
           FROM generate_series(1, 20000) i;
         INSERT INTO templates (name, content) VALUES ('t', 'Hello');
         INSERT INTO segments (name, filter_criteria) VALUES ('s', '{\"attribute\": \"tier\", \"operator\": \"exists\"}');
         INSERT INTO campaigns (name, template_id, segment_id, status, created_at)
         SELECT 'c' || k, t.id, s.id,
                (ARRAY['DRAFT', 'READY', 'RUNNING', 'COMPLETED'])[1 + k % 4],
                now() - make_interval(days => 2 * k)
           FROM templates t, segments s, generate_series(0, 1999) k;
         INSERT INTO messages (campaign_id, recipient_phone, rendered_content, status, provider_sid,
                               sent_at, created_at)
         SELECT c.id, '+1415' || lpad(j::text, 7, '0'), 'Hello',
                CASE WHEN j % 4 = 0 THEN 'SENT' ELSE 'DELIVERED' END,
                'SM' || c.id || 'x' || j, c.created_at + interval '1 minute', c.created_at
           FROM campaigns c, generate_series(1, 20) j;
         INSERT INTO delivery_receipts (event_id, message_sid, message_status, raw_payload, received_at)
         SELECT gen_random_uuid(), m.provider_sid, 'delivered', '{}',
                m.sent_at + make_interval(mins => 1 + (substr(m.recipient_phone, 6)::int % 10))
           FROM messages m WHERE substr(m.recipient_phone, 6)::int % 4 <> 0;
         INSERT INTO inbound_events (event_id, message_sid, from_phone, body, raw_payload, received_at)
         SELECT gen_random_uuid(), 'SMin' || i, '+1415' || lpad(i::text, 7, '0'), 'hi', '{}',
                now() - make_interval(mins => 10 * i)
           FROM generate_series(1, 12) i;",
    )
    .await
    .unwrap();
    c.batch_execute("VACUUM ANALYZE").await.unwrap();
}

/// The plan of `sql`, as text.
async fn plan(c: &deadpool_postgres::Client, sql: &str) -> String {
    c.query(
        &format!("EXPLAIN {}", sql.trim().trim_end_matches(';')),
        &[],
    )
    .await
    .unwrap_or_else(|e| panic!("EXPLAIN {sql}: {e}"))
    .iter()
    .map(|r| r.get::<_, String>(0))
    .collect::<Vec<_>>()
    .join("\n")
}

#[tokio::test]
async fn the_models_three_queries_run_verbatim_with_the_right_answers_through_their_indexes() {
    let app = TestApp::spawn().await;
    populate(&app).await;
    let c = app.pool.get().await.unwrap();

    // 1. Segment evaluation: opted in, in San Francisco and premium.
    let mut got: Vec<String> = c
        .query(ese::reports::MODEL_SEGMENT_EVALUATION, &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    got.sort();
    let want: Vec<String> = (1..=20000)
        .filter(|i| i % 100 == 0 && i % 3 == 0 && i % 7 != 0)
        .map(|i| format!("+1415{i:07}"))
        .collect();
    assert!(!want.is_empty());
    assert_eq!(got, want);
    let p = plan(&c, ese::reports::MODEL_SEGMENT_EVALUATION).await;
    assert!(p.contains("idx_users_attributes_gin"), "{p}");

    // 2. Campaign performance: the campaigns of the last 30 days (k = 0..15,
    // created 2k days ago), 20 messages each, 15 delivered, after a mean of
    // 1 + the mean of j % 10 over the delivered j.
    // Verbatim, inside a query that reads its numeric average as float8.
    let rows = c
        .query(
            &format!(
                "SELECT name, total_sent, delivered, avg_delivery_time_mins::float8 AS avg FROM ({}\n) q",
                ese::reports::MODEL_CAMPAIGN_PERFORMANCE
                    .trim()
                    .trim_end_matches(';')
            ),
            &[],
        )
        .await
        .unwrap();
    let delivered_j: Vec<i32> = (1..=20).filter(|j| j % 4 != 0).collect();
    let mean_mins = delivered_j
        .iter()
        .map(|j| f64::from(1 + j % 10))
        .sum::<f64>()
        / delivered_j.len() as f64;
    let mut names: Vec<String> = rows.iter().map(|r| r.get("name")).collect();
    names.sort();
    let today = chrono::Utc::now().date_naive();
    let mut want: Vec<String> = (0..2000)
        .filter(|k| {
            let created = chrono::Utc::now() - chrono::Duration::days(2 * k);
            created.date_naive() >= today - chrono::Duration::days(30)
        })
        .map(|k| format!("c{k}"))
        .collect();
    want.sort();
    assert_eq!(names, want);
    for r in &rows {
        assert_eq!(r.get::<_, i64>("total_sent"), 20);
        assert_eq!(r.get::<_, i64>("delivered"), 15);
        let avg: f64 = r.get("avg");
        assert!((avg - mean_mins).abs() < 1e-9, "{avg} against {mean_mins}");
    }
    let p = plan(&c, ese::reports::MODEL_CAMPAIGN_PERFORMANCE).await;
    assert!(p.contains("idx_messages_campaign"), "{p}");
    assert!(p.contains("idx_delivery_receipts_message_sid"), "{p}");

    // 3. Real-time dashboard.
    let r = c.query_one(ese::reports::DASHBOARD, &[]).await.unwrap();
    let active = (0..2000).filter(|k| k % 4 == 1 || k % 4 == 2).count() as i64;
    let opted_in = (1..=20000).filter(|i| i % 7 != 0).count() as i64;
    assert_eq!(r.get::<_, i64>("active_campaigns"), active);
    assert_eq!(r.get::<_, i64>("opted_in_users"), opted_in);
    assert_eq!(r.get::<_, i64>("delivered_today"), 15, "campaign c0's");
    assert_eq!(r.get::<_, i64>("recent_inbound"), 5, "10 to 50 minutes ago");
    let p = plan(&c, ese::reports::DASHBOARD).await;
    assert!(p.contains("idx_messages_status_created"), "{p}");

    // The Grafana dashboard shows the same two queries, through the
    // PostgreSQL data source docker-compose provisions.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("config/grafana/dashboards/reports.json")).unwrap(),
    )
    .unwrap();
    let provisioned =
        std::fs::read_to_string(root.join("config/grafana/provisioning/datasources/postgres.yml"))
            .unwrap();
    let uid = dashboard["templating"]["list"][0]["current"]["value"]
        .as_str()
        .unwrap();
    assert!(
        provisioned.contains(&format!("uid: {uid}")),
        "{provisioned}"
    );
    let mut shown = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let sql = target["rawSql"].as_str().unwrap();
            assert!(
                sql == ese::reports::DASHBOARD || sql == ese::reports::MODEL_CAMPAIGN_PERFORMANCE,
                "{}: {sql}",
                panel["title"]
            );
            c.query(sql, &[]).await.unwrap();
            shown += 1;
        }
    }
    assert_eq!(shown, 5);

    // The admin API answers from the same queries.
    let api = app.start_api().await;
    let d = api
        .expect(200, "GET", "/api/v1/reports/dashboard", None)
        .await;
    assert_eq!(
        d,
        json!({"active_campaigns": active, "opted_in_users": opted_in,
               "delivered_today": 15, "recent_inbound": 5})
    );
    let report = api
        .expect(200, "GET", "/api/v1/reports/campaigns", None)
        .await;
    let items = report["items"].as_array().unwrap();
    assert_eq!(items.len(), want.len(), "{report}");
    assert_eq!(items[0]["name"], "c0", "newest first");
    for item in items {
        assert_eq!(item["total_sent"], 20);
        assert_eq!(item["delivered"], 15);
        let avg = item["avg_delivery_time_mins"].as_f64().unwrap();
        assert!((avg - mean_mins).abs() < 1e-9, "{item}");
    }

    // Every message of c0 gets its `sent` callback and a duplicate of its
    // `delivered` one, as providers do: each message still counts once in
    // the API's figures (the model's query, joined straight to the
    // receipts, would count each callback).
    c.batch_execute(
        "INSERT INTO delivery_receipts (event_id, message_sid, message_status, raw_payload, received_at)
         SELECT gen_random_uuid(), d.message_sid, s, '{}', d.received_at + interval '1 second'
           FROM delivery_receipts d, unnest(ARRAY['sent', 'delivered']) s
          WHERE d.message_sid LIKE 'SM' || (SELECT id FROM campaigns WHERE name = 'c0') || 'x%'",
    )
    .await
    .unwrap();
    let today = chrono::Utc::now().date_naive().to_string();
    let report = api
        .expect(
            200,
            "GET",
            &format!("/api/v1/reports/campaigns?since={today}"),
            None,
        )
        .await;
    assert_eq!(
        report["items"].as_array().map(Vec::len),
        Some(1),
        "{report}"
    );
    assert_eq!(report["items"][0]["total_sent"], 20, "{report}");
    assert_eq!(report["items"][0]["delivered"], 15, "{report}");
    let avg = report["items"][0]["avg_delivery_time_mins"]
        .as_f64()
        .unwrap();
    assert!((avg - mean_mins).abs() < 1e-9, "{report}");
    let (status, err) = api
        .call("GET", "/api/v1/reports/campaigns?since=yesterday", None)
        .await;
    assert_eq!(status, 422, "{err}");
    assert_eq!(err["error"]["field"], "/since", "{err}");
}
