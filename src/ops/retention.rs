//! `ese retention [--dry-run] [--as-of TIME]`: the audit trail's expired
//! rows, counted per table, then deleted in batches with a progress bar.

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::db::retention;

/// `--as-of`: an RFC 3339 time to judge expiry at instead of now.
pub fn parse_as_of(text: &str) -> anyhow::Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            anyhow::anyhow!(
                "--as-of {text:?}: not an RFC 3339 time ({e}); e.g. 2033-01-01T00:00:00Z"
            )
        })
}

/// Stops between batches when `stop` is cancelled (SIGINT), saying what was done.
pub async fn retention_command(
    settings: &Settings,
    dry_run: bool,
    as_of: Option<DateTime<Utc>>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let cfg = &settings.retention;
    let cutoff = retention::cutoff(as_of.unwrap_or_else(Utc::now), cfg.audit)?;
    let pool = crate::db::pool(&settings.database)?;
    let expired = retention::expired(&pool, cutoff).await?;
    println!(
        "audit rows received before {} (retention.audit {}):",
        cutoff.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        humantime_serde::re::humantime::format_duration(cfg.audit)
    );
    for e in &expired {
        let oldest = e
            .oldest
            .map(|t| {
                format!(
                    ", oldest {}",
                    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                )
            })
            .unwrap_or_default();
        println!("  {:<18} {:>12} rows expired{oldest}", e.table, e.rows);
    }
    let total: i64 = expired.iter().map(|e| e.rows).sum();
    if dry_run {
        println!("dry run: nothing deleted");
        return Ok(());
    }
    if total == 0 {
        println!("nothing to delete");
        return Ok(());
    }
    let bar = indicatif::ProgressBar::new(total as u64).with_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {pos}/{len} rows ({per_sec}, eta {eta})",
        )?
        .progress_chars("=> "),
    );
    let removed = retention::remove(&pool, cutoff, cfg.batch_size, &stop, |table, rows| {
        bar.set_message(table);
        bar.inc(rows);
    })
    .await?;
    bar.finish_and_clear();
    let Some(removed) = removed else {
        anyhow::bail!(
            "another retention run (a scheduler or `ese retention`) is deleting now; try again when it has finished"
        );
    };
    for (table, rows) in &removed {
        println!("  {table:<18} {rows:>12} rows deleted");
    }
    if stop.is_cancelled() {
        anyhow::bail!("interrupted: the rows above were deleted, the rest is still there");
    }
    Ok(())
}
