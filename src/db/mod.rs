//! PostgreSQL: the connection pool, migrations, how database errors are
//! classified, and the audit trail's retention ([`retention`]).

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use postgres_openssl::MakeTlsConnector;

use crate::config::DatabaseConfig;

pub mod calls;
pub mod retention;

mod embedded {
    refinery::embed_migrations!("migrations");
}

// `FUNCTIONS`: every `sql/functions/*.sql`, embedded by build.rs.
include!(concat!(env!("OUT_DIR"), "/functions.rs"));

/// `sslmode` in `database.url`, read as libpq reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// TLS when the server offers it, the certificate not checked (libpq's default).
    Prefer,
    /// TLS or fail; the certificate checked only when `sslrootcert` is given.
    Require,
    /// TLS, the server's certificate signed by `sslrootcert`'s CA.
    VerifyCa,
    /// As verify-ca, and the certificate names the host connected to.
    VerifyFull,
}

/// How to reach PostgreSQL: the connection settings and the TLS connector
/// that does what `sslmode` asks.
pub struct Target {
    pub config: tokio_postgres::Config,
    pub tls: MakeTlsConnector,
    pub mode: SslMode,
}

/// Parses `url` (a `postgres://` URL), honouring libpq's `sslmode`
/// (disable, prefer, require, verify-ca, verify-full) and `sslrootcert`,
/// which tokio-postgres alone does not: it knows no verify modes and no CA file.
pub fn target(url: &str) -> anyhow::Result<Target> {
    let mut parsed = url::Url::parse(url)
        .map_err(|e| anyhow::anyhow!("database.url is not a postgres:// URL: {e}"))?;
    let (mut mode, mut root_cert) = (SslMode::Prefer, None);
    let mut kept = Vec::new();
    for (k, v) in parsed.query_pairs() {
        match k.as_ref() {
            "sslmode" => {
                mode = match v.as_ref() {
                    "disable" => SslMode::Disable,
                    "allow" | "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => anyhow::bail!(
                        "database.url: sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                    ),
                }
            }
            "sslrootcert" => root_cert = Some(v.into_owned()),
            _ => kept.push((k.into_owned(), v.into_owned())),
        }
    }
    // tokio-postgres itself only knows whether TLS is off, wanted or required.
    let base = match mode {
        SslMode::Disable => "disable",
        SslMode::Prefer => "prefer",
        _ => "require",
    };
    kept.push(("sslmode".into(), base.into()));
    parsed.query_pairs_mut().clear().extend_pairs(&kept);
    let config: tokio_postgres::Config = parsed
        .as_str()
        .parse()
        .map_err(|e| anyhow::anyhow!("database.url is not a PostgreSQL URL: {e}"))?;

    let mut builder = SslConnector::builder(SslMethod::tls_client())
        .map_err(|e| anyhow::anyhow!("TLS for PostgreSQL: {e}"))?;
    let verify = matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull)
        || (mode == SslMode::Require && root_cert.is_some());
    match (&root_cert, verify) {
        (Some(path), true) => builder.set_ca_file(path).map_err(|e| {
            anyhow::anyhow!(
                "database.url: sslrootcert={path} cannot be read as PEM CA certificates: {e}"
            )
        })?,
        (None, true) => builder
            .set_default_verify_paths()
            .map_err(|e| anyhow::anyhow!("TLS for PostgreSQL: the system's CAs: {e}"))?,
        (_, false) => {}
    }
    builder.set_verify(if verify {
        SslVerifyMode::PEER
    } else {
        SslVerifyMode::NONE
    });
    let mut tls = MakeTlsConnector::new(builder.build());
    if mode != SslMode::VerifyFull {
        // Only verify-full checks that the certificate names the host.
        tls.set_callback(|connect, _| {
            connect.set_verify_hostname(false);
            Ok(())
        });
    }
    Ok(Target { config, tls, mode })
}

/// Opens one connection to `url` (its `sslmode` honoured) and drives it in
/// the background; for migrations and tools, not the stages (they use the pool).
pub async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let t = target(url)?;
    let (client, connection) = t.config.connect(t.tls).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot connect to PostgreSQL at database.url ({}): {}",
            crate::db::redact(url),
            describe(&e)
        )
    })?;
    tokio::spawn(connection);
    Ok(client)
}

/// A connection error in full: tokio-postgres's own text hides the TLS cause.
pub fn describe(e: &tokio_postgres::Error) -> String {
    use std::error::Error;
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        // OpenSSL repeats its cause at each level; say it once.
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

/// The URL without its password, for banners, logs and errors.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// Builds the pool shared by every stage of the process (no connection is
/// made yet). A connection is handed out again as long as it is open
/// (`Fast`): `Verified` spent a round trip on an empty query before every
/// transaction, and a connection that dies after the check fails its
/// statement all the same, which every caller retries as transient.
pub fn pool(cfg: &DatabaseConfig) -> anyhow::Result<Pool> {
    let t = target(&cfg.url)?;
    let manager = Manager::from_config(
        t.config,
        t.tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(cfg.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(30)))
        .create_timeout(Some(Duration::from_secs(10)))
        .build()
        .map_err(|e| anyhow::anyhow!("database pool: {e}"))
}

/// Applies pending migrations from `migrations/`, then every SQL function's
/// live definition from `sql/functions/` (`CREATE OR REPLACE`, so a function
/// is changed in its one file and never copied into a migration). Returns
/// the names of the migrations applied now.
pub async fn migrate(url: &str) -> anyhow::Result<Vec<String>> {
    let mut client = connect(url).await?;
    let report = embedded::migrations::runner()
        .run_async(&mut client)
        .await
        .map_err(|e| anyhow::anyhow!("migration failed: {e}"))?;
    let tx = client.transaction().await?;
    for (file, text) in FUNCTIONS {
        tx.batch_execute(text)
            .await
            .map_err(|e| anyhow::anyhow!("sql/functions/{file}: {}", describe(&e)))?;
    }
    tx.commit().await?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| m.to_string())
        .collect())
}

/// Applies the migrations up to and including `version`, and no SQL
/// function (their live definitions name the newest schema): a database as
/// an older release left it, for testing the upgrade from it.
pub async fn migrate_until(url: &str, version: i32) -> anyhow::Result<()> {
    let mut client = connect(url).await?;
    embedded::migrations::runner()
        .set_target(refinery::Target::Version(version))
        .run_async(&mut client)
        .await
        .map_err(|e| anyhow::anyhow!("migration failed: {e}"))?;
    Ok(())
}

/// Appends `rows` with a binary `COPY` (`copy`: `COPY t (cols) FROM STDIN
/// BINARY`, `types` its column types) inside a savepoint. `Ok(false)` when a
/// row violates a unique constraint (a replay of rows already stored): the
/// savepoint is rolled back and nothing of this COPY remains, so the caller
/// inserts the rows with `ON CONFLICT` instead. COPY costs PostgreSQL about a
/// quarter less CPU than an `INSERT … SELECT unnest(…)` of the same rows.
pub async fn copy_new_rows<'a>(
    tx: &deadpool_postgres::Transaction<'_>,
    copy: &str,
    types: &[tokio_postgres::types::Type],
    rows: impl IntoIterator<Item = Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)>>,
) -> Result<bool, tokio_postgres::Error> {
    tx.batch_execute("SAVEPOINT ese_copy").await?;
    let written = async {
        let sink = tx.copy_in(copy).await?;
        let writer = tokio_postgres::binary_copy::BinaryCopyInWriter::new(sink, types);
        futures::pin_mut!(writer);
        for row in rows {
            writer.as_mut().write(&row).await?;
        }
        writer.finish().await
    }
    .await;
    match written {
        Ok(_) => Ok(true),
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT ese_copy").await?;
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// What a database error means for the record that caused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Connection lost, server shutting down, serialization failure, pool timeout: retry.
    Transient,
    /// The data broke a constraint or a type: the record is poison.
    Data,
    /// A bug or a broken schema (syntax, missing table): stop.
    Fatal,
}

/// Classifies a tokio-postgres error by SQLSTATE class; an error without
/// one by what the client says went wrong (its kinds are not public, their
/// messages are fixed): the connection (retry), a value that cannot be
/// converted for its parameter (the record is poison), or a statement and
/// its Rust side disagreeing — row counts, columns, result types (a bug: it
/// would fail the same way forever, so stop with the reason).
pub fn classify(e: &tokio_postgres::Error) -> ErrorClass {
    match e.code() {
        None if e.is_closed() => ErrorClass::Transient,
        None => classify_message(&e.to_string()),
        Some(code) => {
            let s = code.code();
            match &s[..2] {
                "08" | "40" | "53" | "57" | "58" | "55" => ErrorClass::Transient,
                "22" | "23" => ErrorClass::Data,
                "P0" => ErrorClass::Data, // raised by our own triggers and functions
                _ => ErrorClass::Fatal,
            }
        }
    }
}

/// [`classify`] of a client-side error (no SQLSTATE) by its message.
pub fn classify_message(message: &str) -> ErrorClass {
    const TRANSIENT: [&str; 7] = [
        "error communicating with the server",
        "connection closed",
        "error connecting to server",
        "timeout waiting for server",
        "error performing TLS handshake",
        "unexpected message from server",
        "error parsing response from server",
    ];
    if TRANSIENT.iter().any(|t| message.starts_with(t)) {
        ErrorClass::Transient
    } else if message.starts_with("error serializing parameter")
        || message.starts_with("error encoding message to server")
    {
        ErrorClass::Data
    } else {
        // Deserializing a column, row or column counts, parameter counts,
        // authentication, configuration: the same again fails again.
        ErrorClass::Fatal
    }
}

/// Splits keyed rows into rounds in which no key appears twice, keeping each
/// key's order: one `INSERT … ON CONFLICT DO UPDATE` may not touch a row
/// twice, so a batch holding two events for one row runs as two statements.
pub fn rounds<K: std::hash::Hash + Eq, T>(rows: impl IntoIterator<Item = (K, T)>) -> Vec<Vec<T>> {
    let mut seen: std::collections::HashMap<K, usize> = std::collections::HashMap::new();
    let mut out: Vec<Vec<T>> = Vec::new();
    for (key, row) in rows {
        let round = seen.entry(key).or_insert(0);
        if out.len() <= *round {
            out.push(Vec::new());
        }
        out[*round].push(row);
        *round += 1;
    }
    out
}
