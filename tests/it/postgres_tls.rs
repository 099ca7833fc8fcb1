//! PostgreSQL over TLS: `sslmode` and `sslrootcert` in `DATABASE_URL`, against
//! the local server that `scripts/postgres up` runs with `ssl = on` and a test CA.

use crate::harness::TestApp;

/// The test CA that signed the local server's certificate, and one that did not.
fn cas() -> (String, String) {
    let ca = std::env::var("ESE_TEST_PG_CA")
        .unwrap_or_else(|_| "/var/tmp/ese-postgres/tls/ca.crt".to_string());
    assert!(
        std::path::Path::new(&ca).is_file(),
        "{ca} is missing: run scripts/postgres up (it makes the test CA and turns TLS on)"
    );
    let other = std::path::Path::new(&ca)
        .with_file_name("other-ca.crt")
        .to_string_lossy()
        .into_owned();
    (ca, other)
}

fn with(url: &str, query: &str) -> String {
    format!("{url}?{query}")
}

async fn uses_tls(url: &str) -> bool {
    let pool = ese::db::pool(&ese::config::DatabaseConfig {
        url: url.to_string(),
        pool_size: 1,
    })
    .expect("pool");
    let c = pool.get().await.expect("a TLS connection");
    c.query_one(
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        &[],
    )
    .await
    .expect("pg_stat_ssl")
    .get(0)
}

#[tokio::test]
async fn verify_full_with_the_right_ca_connects_over_tls_and_a_wrong_ca_fails_clearly() {
    let (ca, other) = cas();
    let app = TestApp::spawn().await;
    let url = app.settings.database.url.clone();

    let full = with(&url, &format!("sslmode=verify-full&sslrootcert={ca}"));
    ese::db::migrate(&full)
        .await
        .expect("migrate over verify-full");
    assert!(uses_tls(&full).await, "verify-full connection is TLS");
    let verify_ca = with(&url, &format!("sslmode=verify-ca&sslrootcert={ca}"));
    assert!(uses_tls(&verify_ca).await);
    assert!(uses_tls(&with(&url, "sslmode=require")).await);
    assert!(!uses_tls(&with(&url, "sslmode=disable")).await);

    let wrong = with(&url, &format!("sslmode=verify-full&sslrootcert={other}"));
    let err = ese::db::migrate(&wrong).await.unwrap_err().to_string();
    assert!(err.contains("certificate verify failed"), "{err}");
    assert!(err.contains("cannot connect to PostgreSQL"), "{err}");

    let bad = with(&url, "sslmode=verify-everything");
    let err = ese::db::migrate(&bad).await.unwrap_err().to_string();
    assert!(err.contains("sslmode=verify-everything"), "{err}");

    // The engine itself, as a user runs it.
    let (ok, out, err) = app
        .run_ese_with(&["migrate"], &[("DATABASE_URL", full.clone())])
        .await;
    assert!(ok, "ese migrate over verify-full: {err}");
    assert!(out.contains("up to date"), "{out}");
    let (ok, _, err) = app
        .run_ese_with(&["migrate"], &[("DATABASE_URL", wrong.clone())])
        .await;
    assert!(!ok && err.contains("certificate verify failed"), "{err}");
}
