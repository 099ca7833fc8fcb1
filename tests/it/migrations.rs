//! The schema: a fresh database gets all of it, and Postgres itself refuses bad data.

use crate::harness::{TABLES, TestApp};

#[tokio::test]
async fn fresh_database_gets_the_full_schema_and_refuses_bad_data() {
    let app = TestApp::spawn().await;
    let c = app.pool.get().await.unwrap();
    for table in TABLES {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM information_schema.tables WHERE table_name = $1",
                &[&table],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "table {table} exists");
    }
    let gin: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE tablename = 'users' AND indexdef LIKE '%USING gin%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(gin, 1, "GIN index on users.attributes");
    // Room on each users page for the delivery stamp's HOT update (V17).
    let options: Option<Vec<String>> = c
        .query_one(
            "SELECT reloptions FROM pg_class WHERE oid = 'users'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(options, Some(vec!["fillfactor=90".to_string()]));

    // Migrating again is a no-op.
    let again = ese::db::migrate(&app.settings.database.url).await.unwrap();
    assert!(again.is_empty(), "second migrate applied {again:?}");

    // E.164 check.
    let err = c
        .execute("INSERT INTO users (phone_e164) VALUES ('0612345678')", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "23514", "{err}");
    c.execute(
        "INSERT INTO users (phone_e164) VALUES ('+14155552671')",
        &[],
    )
    .await
    .unwrap();

    // Consent and status vocabularies.
    let err = c
        .execute("UPDATE users SET consent_state = 'MAYBE'", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "23514", "{err}");

    c.batch_execute(
        "INSERT INTO templates (id, name, content) VALUES (ese_legacy_uuid(1), 't', 'Hi {name}');
         INSERT INTO segments (id, name, filter_criteria) VALUES (ese_legacy_uuid(1), 's', '{}');
         INSERT INTO campaigns (id, name, template_id, segment_id)
         SELECT ese_legacy_uuid(1), 'c', t.id, s.id FROM templates t, segments s;
         INSERT INTO messages (campaign_id, recipient_phone, rendered_content) VALUES (ese_legacy_uuid(1), '+14155552671', 'Hi');",
    )
    .await
    .unwrap();
    let err = c
        .execute("UPDATE messages SET status = 'LOST'", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "23514", "{err}");
    let err = c
        .execute("UPDATE campaigns SET status = 'DONE'", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "23514", "{err}");

    // delivered_at ≥ sent_at.
    let err = c
        .execute(
            "UPDATE messages SET sent_at = now(), delivered_at = now() - interval '1 minute'",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "23514", "{err}");

    // A duplicate (campaign, recipient) is refused.
    let err = c
        .execute(
            "INSERT INTO messages (campaign_id, recipient_phone, rendered_content) VALUES (ese_legacy_uuid(1), '+14155552671', 'again')",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "23505", "{err}");

    // A template or segment an active campaign uses cannot be deleted; a
    // finished campaign keeps its row without it; a campaign's messages go
    // with it.
    c.execute(
        "UPDATE campaigns SET status = 'RUNNING' WHERE id = ese_legacy_uuid(1)",
        &[],
    )
    .await
    .unwrap();
    for table in ["templates", "segments"] {
        let err = c
            .execute(
                &format!("DELETE FROM {table} WHERE id = ese_legacy_uuid(1)"),
                &[],
            )
            .await
            .unwrap_err();
        assert_eq!(err.code().unwrap().code(), "23514", "{table}: {err}");
    }
    c.batch_execute(
        "UPDATE campaigns SET status = 'COMPLETED' WHERE id = ese_legacy_uuid(1);
         DELETE FROM templates WHERE id = ese_legacy_uuid(1); DELETE FROM segments WHERE id = ese_legacy_uuid(1);",
    )
    .await
    .unwrap();
    let cleared: bool = c
        .query_one(
            "SELECT template_id IS NULL AND segment_id IS NULL FROM campaigns WHERE id = ese_legacy_uuid(1)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(cleared);
    c.execute("DELETE FROM campaigns WHERE id = ese_legacy_uuid(1)", &[])
        .await
        .unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM messages", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "messages cascade with their campaign");

    // Consent history is append-only.
    c.execute(
        "INSERT INTO consent_events (phone_number, new_state, source, source_event_id, occurred_at)
         VALUES ('+14155552671', 'OPT_OUT', 'keyword', 'e1', now())",
        &[],
    )
    .await
    .unwrap();
    assert!(c.execute("DELETE FROM consent_events", &[]).await.is_err());
    assert!(
        c.execute("UPDATE consent_events SET new_state = 'OPT_IN'", &[])
            .await
            .is_err()
    );
}

/// Client-side PostgreSQL errors (no SQLSTATE) that would fail the same way
/// again are not called transient, so a stage never retries them forever: a
/// value that cannot be sent is the record's fault (DLQ), a statement whose
/// rows or columns the code misreads is a bug (the stage stops).
#[tokio::test]
async fn errors_without_a_sqlstate_are_poison_or_fatal_never_retried_forever() {
    use ese::db::{ErrorClass, classify};
    let app = TestApp::spawn().await;
    let c = app.pool.get().await.unwrap();
    // A parameter the column's type cannot take.
    let e = c
        .query_one("SELECT $1::int4", &[&"not a number"])
        .await
        .expect_err("wrong parameter type");
    assert_eq!(e.code(), None, "{e}");
    assert_eq!(classify(&e), ErrorClass::Data, "{e}");
    // Exactly one row expected, none returned.
    let e = c
        .query_one("SELECT 1 WHERE false", &[])
        .await
        .expect_err("no row");
    assert_eq!(classify(&e), ErrorClass::Fatal, "{e}");
    // A column read as the wrong Rust type.
    let row = c.query_one("SELECT 'text'::text", &[]).await.unwrap();
    let e = row.try_get::<_, i64>(0).expect_err("wrong column type");
    assert_eq!(classify(&e), ErrorClass::Fatal, "{e}");
    // (The connection going away stays transient: the reliability suite
    // restarts PostgreSQL under load and loses nothing.)
}

/// A database filled at the schema before the data model's names (V9)
/// migrates forward without losing or changing a row: every table's data,
/// read before under the old names and after under the model's, is the same.
#[tokio::test]
async fn a_database_at_the_previous_schema_migrates_forward_without_losing_a_row() {
    let db = crate::harness::EmptyDb::create().await;
    ese::db::migrate_until(&db.url, 9).await.unwrap();
    let c = crate::harness::connect(&db.url).await;
    c.batch_execute(
        "INSERT INTO users (phone_number, attributes, consent_state, consent_updated_at, last_message_received)
         VALUES ('+14155550001', '{\"first_name\": \"Ada\", \"tier\": \"premium\"}', 'OPT_IN', '2026-01-01T10:00:00Z', NULL),
                ('+14155550002', '{}', 'OPT_OUT', '2026-01-02T10:00:00Z', '2026-01-02T09:59:00Z'),
                ('+447700900003', '{\"city\": \"London\"}', 'UNKNOWN', NULL, '2026-01-03T08:00:00Z');
         INSERT INTO templates (name, channel, body, variables, defaults)
         VALUES ('welcome', 'SMS', 'Hi {first_name}, from {city}', '{first_name,city}', '{\"city\": \"here\"}'),
                ('plain', 'WHATSAPP', 'Hello', '{}', '{}');
         INSERT INTO segments (name, description, filter, estimated_audience_size, estimated_at)
         VALUES ('premium', 'tier', '{\"attribute\": \"tier\", \"operator\": \"equals\", \"value\": \"premium\"}', 1, now()),
                ('everyone', NULL, '{\"attribute\": \"x\", \"operator\": \"not_exists\"}', NULL, NULL);
         INSERT INTO campaigns (name, template_id, segment_id, status, rate_limit_per_second, quiet_hours_start, quiet_hours_end, started_at)
         SELECT 'spring', t.id, s.id, 'RUNNING', 25, '21:00', '09:00', now()
           FROM templates t, segments s WHERE t.name = 'welcome' AND s.name = 'premium';
         INSERT INTO campaigns (name, template_id, segment_id)
         SELECT 'draft', t.id, s.id FROM templates t, segments s WHERE t.name = 'plain' AND s.name = 'everyone';
         INSERT INTO fanout_progress (campaign_id, last_user_id, messages_created)
         SELECT id, 1, 1 FROM campaigns WHERE name = 'spring';
         INSERT INTO messages (campaign_id, user_id, recipient_phone, body, status, provider_sid, sent_at, delivered_at)
         SELECT c.id, u.id, u.phone_number, 'Hi Ada, from here', 'DELIVERED', 'SM0001', '2026-01-05T10:00:00Z', '2026-01-05T10:00:05Z'
           FROM campaigns c, users u WHERE c.name = 'spring' AND u.phone_number = '+14155550001';
         -- A reply to a number without a users row (the old schema allowed it).
         INSERT INTO messages (recipient_phone, body, kind, idempotency_key, status)
         VALUES ('+14155550009', 'You are unsubscribed.', 'opt_out_confirmation', 'reply:x', 'QUEUED');
         INSERT INTO delivery_receipts (message_sid, status, error_code, raw_payload, received_at, event_id)
         VALUES ('SM0001', 'sent', NULL, '{\"MessageStatus\": \"sent\"}', '2026-01-05T10:00:01Z', gen_random_uuid()),
                ('SM0001', 'delivered', NULL, '{\"MessageStatus\": \"delivered\"}', '2026-01-05T10:00:05Z', gen_random_uuid()),
                ('SM0404', 'undelivered', 30003, '{\"MessageStatus\": \"undelivered\"}', '2026-01-05T10:01:00Z', gen_random_uuid());
         INSERT INTO inbound_events (message_sid, from_phone, channel, body, raw_payload, received_at, event_id)
         VALUES ('SM1001', '+14155550002', 'SMS', 'STOP', '{\"Body\": \"STOP\"}', '2026-01-02T09:59:00Z', gen_random_uuid());
         INSERT INTO consent_events (phone_number, old_state, new_state, source, keyword, source_event_id, occurred_at, applied)
         VALUES ('+14155550002', 'OPT_IN', 'OPT_OUT', 'keyword', 'STOP', 'in:SM1001', '2026-01-02T09:59:00Z', true);
         INSERT INTO user_channels (phone_number, channel, last_inbound_at)
         VALUES ('+14155550002', 'SMS', '2026-01-02T09:59:00Z');",
    )
    .await
    .unwrap();

    // (table, before under the old names, after under the model's names).
    let reads = [
        (
            "users",
            "SELECT row(id, phone_number, attributes, consent_state, consent_updated_at, last_message_received,
                        attribute_times, created_at, updated_at)::text FROM users ORDER BY id",
            "SELECT row(seq, phone_e164, attributes, consent_state, consent_updated_at, last_message_received,
                        attribute_times, created_at, last_updated)::text FROM users
              WHERE phone_e164 <> '+14155550009' ORDER BY seq",
        ),
        (
            "templates",
            // Old ids map to UUIDs deterministically (ese_legacy_uuid, V14 and V15).
            "SELECT row(LEGACY(id), name, channel, body, to_jsonb(variables), defaults, char_length(body), created_at)::text
               FROM templates ORDER BY id",
            "SELECT row(id, name, channel, content, variables, defaults, character_count, created_at)::text
               FROM templates ORDER BY id",
        ),
        (
            "segments",
            "SELECT row(LEGACY(id), name, description, filter, coalesce(estimated_audience_size, 0), estimated_at)::text
               FROM segments ORDER BY id",
            "SELECT row(id, name, description, filter_criteria, estimated_audience_size, estimated_at)::text
               FROM segments ORDER BY id",
        ),
        (
            "campaigns",
            "SELECT (to_jsonb(t) || jsonb_build_object('id', LEGACY(id), 'template_id', LEGACY(template_id),
                                                       'segment_id', LEGACY(segment_id)))::text
               FROM campaigns t ORDER BY id",
            "SELECT to_jsonb(t)::text FROM campaigns t ORDER BY id",
        ),
        (
            "messages",
            "SELECT row(LEGACY(id), LEGACY(campaign_id), recipient_phone, channel, body, status, provider_sid, sent_at,
                        delivered_at, kind, idempotency_key, retry_count, created_at)::text FROM messages ORDER BY id",
            "SELECT row(id, campaign_id, recipient_phone, channel, rendered_content, status, provider_sid, sent_at,
                        delivered_at, kind, idempotency_key, retry_count, created_at)::text FROM messages ORDER BY id",
        ),
        (
            "delivery_receipts",
            "SELECT row(LEGACY(id), message_sid,
                        status, error_code, raw_payload, received_at, event_id)::text
               FROM delivery_receipts ORDER BY id",
            "SELECT row(id, message_sid, message_status, error_code, raw_payload, received_at, event_id)::text
               FROM delivery_receipts ORDER BY id",
        ),
        (
            "inbound_events",
            "SELECT (to_jsonb(t) || jsonb_build_object('id', LEGACY(id)))::text
               FROM inbound_events t ORDER BY id",
            "SELECT to_jsonb(t)::text FROM inbound_events t ORDER BY id",
        ),
        (
            "consent_events",
            "SELECT t::text FROM consent_events t ORDER BY id",
            "SELECT t::text FROM consent_events t ORDER BY id",
        ),
        (
            "fanout_progress",
            "SELECT (to_jsonb(t) || jsonb_build_object('campaign_id', LEGACY(campaign_id)))::text
               FROM fanout_progress t ORDER BY campaign_id",
            "SELECT to_jsonb(t)::text FROM fanout_progress t ORDER BY campaign_id",
        ),
        (
            "user_channels",
            "SELECT t::text FROM user_channels t ORDER BY phone_number, channel",
            "SELECT t::text FROM user_channels t ORDER BY phone_number, channel",
        ),
    ];
    let read = async |sql: &str| -> Vec<String> {
        c.query(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .iter()
            .map(|r| r.get(0))
            .collect()
    };
    // A v14 schema has no ese_legacy_uuid yet: the mapping, spelled out.
    let legacy = |sql: &str| {
        let mut out = String::new();
        let mut rest = sql;
        while let Some(i) = rest.find("LEGACY(") {
            let close = i + rest[i..].find(')').expect("LEGACY(col)");
            let column = &rest[i + "LEGACY(".len()..close];
            out.push_str(&rest[..i]);
            out.push_str(&format!(
                "('00000000-0000-8000-8000-' || lpad(to_hex({column}), 12, '0'))::uuid"
            ));
            rest = &rest[close + 1..];
        }
        out + rest
    };
    let mut before = Vec::new();
    for (_, old, _) in &reads {
        before.push(read(&legacy(old)).await);
    }
    // A send record written before the upgrade (schema v1, a long id).
    let old_message: i64 = c
        .query_one("SELECT id FROM messages WHERE provider_sid = 'SM0001'", &[])
        .await
        .unwrap()
        .get(0);
    let v1 =
        apache_avro::Schema::parse_str(include_str!("../../schemas/send_request.v1.avsc")).unwrap();
    let mut record = apache_avro::types::Record::new(&v1).unwrap();
    record.put("message_id", old_message);
    record.put(
        "campaign_id",
        apache_avro::types::Value::Union(0, Box::new(apache_avro::types::Value::Null)),
    );
    record.put("recipient", "+14155550001");
    record.put("channel", "SMS");
    record.put("body", "Hi Ada, from here");
    record.put("attempt", 0);
    record.put("kind", "campaign");
    record.put(
        "not_before",
        apache_avro::types::Value::Union(0, Box::new(apache_avro::types::Value::Null)),
    );
    let mut framed = vec![0xC3, 0x01];
    framed.extend_from_slice(&v1.fingerprint::<apache_avro::rabin::Rabin>().bytes[..8]);
    apache_avro::writer::datum::GenericDatumWriter::builder(&v1)
        .build()
        .unwrap()
        .write_value(&mut framed, apache_avro::types::Value::from(record))
        .unwrap();
    let applied = ese::db::migrate(&db.url).await.unwrap();
    assert!(!applied.is_empty(), "the newer migrations applied");
    for ((table, _, new), rows) in reads.iter().zip(before) {
        assert!(!rows.is_empty(), "{table} was filled");
        assert_eq!(read(new).await, rows, "{table} after the migration");
    }
    // The reply's recipient is now a person, whose consent is unknown.
    let state: String = c
        .query_one(
            "SELECT consent_state FROM users WHERE phone_e164 = '+14155550009'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, "UNKNOWN");
    // The model's names resolve, its defaults hold, and its indexes exist.
    c.batch_execute(
        "SELECT phone_e164, created_at, last_updated, consent_state, consent_updated_at, attributes,
                last_message_received FROM users;
         SELECT id, name, template_id, segment_id, status, schedule_time, rate_limit_per_second,
                quiet_hours_start, quiet_hours_end FROM campaigns;
         SELECT id, name, content, variables, character_count FROM templates;
         SELECT id, name, filter_criteria, estimated_audience_size FROM segments;
         SELECT id, recipient_phone, campaign_id, rendered_content, provider_sid, status, sent_at,
                delivered_at, error_code, retry_count FROM messages;
         SELECT id, message_sid, raw_payload, message_status, error_code, received_at FROM delivery_receipts;
         SELECT id, raw_payload, message_sid, from_phone, body, received_at, processing_status FROM inbound_events;",
    )
    .await
    .unwrap();
    let defaults: String = c
        .query_one(
            "INSERT INTO campaigns (name, template_id, segment_id)
             SELECT 'defaults', t.id, s.id FROM templates t, segments s LIMIT 1
             RETURNING row(status, rate_limit_per_second, quiet_hours_start, quiet_hours_end)::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(defaults, "(DRAFT,1,22:00:00,08:00:00)");
    // The audit trail's ids are UUIDs; a row written by others gets one too.
    let ids: String = c
        .query_one(
            "SELECT string_agg(table_name || '.' || column_name || ' ' || data_type, ', ' ORDER BY table_name)
               FROM information_schema.columns
              WHERE table_name IN ('delivery_receipts', 'inbound_events') AND column_name = 'id'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ids, "delivery_receipts.id uuid, inbound_events.id uuid");
    let references: String = c
        .query_one(
            "SELECT string_agg(table_name || '.' || column_name || ' ' || data_type, ', '
                               ORDER BY table_name, column_name)
               FROM information_schema.columns
              WHERE table_name IN ('templates', 'segments', 'campaigns', 'messages', 'fanout_progress')
                AND column_name IN ('id', 'template_id', 'segment_id', 'campaign_id')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        references,
        "campaigns.id uuid, campaigns.segment_id uuid, campaigns.template_id uuid, \
         fanout_progress.campaign_id uuid, messages.campaign_id uuid, messages.id uuid, \
         segments.id uuid, templates.id uuid"
    );
    // The model's default for every id, for rows written by others.
    let defaults = read(
        "SELECT table_name || ' ' || column_default FROM information_schema.columns
          WHERE column_name = 'id' AND table_name IN ('templates', 'segments', 'campaigns',
                'messages', 'delivery_receipts', 'inbound_events')
          ORDER BY table_name",
    )
    .await;
    assert_eq!(
        defaults,
        [
            "campaigns gen_random_uuid()",
            "delivery_receipts gen_random_uuid()",
            "inbound_events gen_random_uuid()",
            "messages gen_random_uuid()",
            "segments gen_random_uuid()",
            "templates gen_random_uuid()",
        ]
    );
    // The send record of before still finds its message.
    let send: ese::records::SendRequest = ese::codec::Codec::single_object()
        .unwrap()
        .decode(&framed)
        .await
        .unwrap();
    assert_eq!(send.message_id, ese::records::legacy_uuid(old_message));
    let body: String = c
        .query_one(
            "SELECT rendered_content FROM messages WHERE id = $1",
            &[&send.message_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(body, "Hi Ada, from here");
    for index in [
        "idx_users_attributes_gin",
        "idx_users_consent_state",
        "idx_messages_recipient",
        "idx_messages_campaign",
        "idx_messages_status_created",
        "idx_delivery_receipts_status_received",
        "idx_inbound_events_from_received",
        "idx_messages_provider_sid",
        "idx_delivery_receipts_message_sid",
    ] {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_indexes WHERE indexname = $1",
                &[&index],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "index {index}");
    }
}
