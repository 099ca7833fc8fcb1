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

    // Migrating again is a no-op.
    let again = ese::db::migrate(&app.settings.database.url).await.unwrap();
    assert!(again.is_empty(), "second migrate applied {again:?}");

    // E.164 check.
    let err = c
        .execute(
            "INSERT INTO users (phone_number) VALUES ('0612345678')",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "23514", "{err}");
    c.execute(
        "INSERT INTO users (phone_number) VALUES ('+14155552671')",
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
        "INSERT INTO templates (id, name, body) VALUES (1, 't', 'Hi {name}');
         INSERT INTO segments (id, name, filter) VALUES (1, 's', '{}');
         INSERT INTO campaigns (id, name, template_id, segment_id) VALUES (1, 'c', 1, 1);
         INSERT INTO messages (campaign_id, recipient_phone, body) VALUES (1, '+14155552671', 'Hi');",
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
            "INSERT INTO messages (campaign_id, recipient_phone, body) VALUES (1, '+14155552671', 'again')",
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "23505", "{err}");

    // A referenced template or segment cannot be deleted; a campaign's
    // messages go with it.
    let err = c
        .execute("DELETE FROM templates WHERE id = 1", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "23503", "{err}");
    let err = c
        .execute("DELETE FROM segments WHERE id = 1", &[])
        .await
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), "23503", "{err}");
    c.execute("DELETE FROM campaigns WHERE id = 1", &[])
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
