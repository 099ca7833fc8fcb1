//! Which message ids keep fan-out and the sender fastest (issue 21: the
//! data model's UUID ids): the same messages-shaped table keyed three ways —
//! the BIGSERIAL of before, `gen_random_uuid()` by default in the database,
//! and UUIDv7 (time-ordered) made by the engine — filled page by page as the
//! fan-out inserts (`INSERT … SELECT unnest(…) RETURNING id`, pages of
//! 5,000), then every message claimed by id in batches of 500 in send order
//! as the sender does. BIGSERIAL is the ceiling, measured in the same run.

use std::time::{Duration, Instant};

use super::Scratch;
use ese::config::Settings;

const PAGE: usize = 5000;
const CLAIM: usize = 500;

#[derive(Clone, Copy, Debug)]
enum Ids {
    Serial,
    RandomUuid,
    EngineV7,
}

impl Ids {
    fn table(self) -> &'static str {
        match self {
            Ids::Serial => "ids_serial",
            Ids::RandomUuid => "ids_random",
            Ids::EngineV7 => "ids_v7",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Ids::Serial => "id BIGSERIAL PRIMARY KEY",
            Ids::RandomUuid => "id UUID PRIMARY KEY DEFAULT gen_random_uuid()",
            Ids::EngineV7 => "id UUID PRIMARY KEY",
        }
    }
}

struct Figures {
    insert: Duration,
    last_pages: Duration,
    claim: Duration,
    size_mb: f64,
}

async fn run_one(
    client: &deadpool_postgres::Client,
    ids: Ids,
    rows: usize,
) -> anyhow::Result<Figures> {
    let table = ids.table();
    client
        .batch_execute(&format!(
            "CREATE TABLE {table} ({}, campaign_id UUID NOT NULL, recipient_phone TEXT NOT NULL,
               rendered_content TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'QUEUED',
               created_at TIMESTAMPTZ NOT NULL DEFAULT now())",
            ids.key()
        ))
        .await?;
    let campaign = uuid::Uuid::now_v7();
    let (mut insert, mut last_pages) = (Duration::ZERO, Duration::ZERO);
    let pages = rows.div_ceil(PAGE);
    // Ids as the sender would bind them: bigint or uuid arrays.
    let (mut serials, mut uuids): (Vec<Vec<i64>>, Vec<Vec<uuid::Uuid>>) = (Vec::new(), Vec::new());
    for page in 0..pages {
        let phones: Vec<String> = (0..PAGE)
            .map(|i| format!("+1415{:07}", page * PAGE + i))
            .collect();
        let bodies: Vec<String> = (0..PAGE)
            .map(|i| format!("Hello {i}, your order shipped"))
            .collect();
        let started = Instant::now();
        let returned = match ids {
            Ids::EngineV7 => {
                let new: Vec<uuid::Uuid> = (0..PAGE).map(|_| uuid::Uuid::now_v7()).collect();
                client
                    .query(
                        &format!(
                            "INSERT INTO {table} (id, campaign_id, recipient_phone, rendered_content)
                             SELECT unnest($1::uuid[]), $2, unnest($3::text[]), unnest($4::text[])
                             RETURNING id"
                        ),
                        &[&new, &campaign, &phones, &bodies],
                    )
                    .await?
            }
            _ => {
                client
                    .query(
                        &format!(
                            "INSERT INTO {table} (campaign_id, recipient_phone, rendered_content)
                             SELECT $1, unnest($2::text[]), unnest($3::text[])
                             RETURNING id"
                        ),
                        &[&campaign, &phones, &bodies],
                    )
                    .await?
            }
        };
        let took = started.elapsed();
        insert += took;
        if page + 10 >= pages {
            last_pages += took;
        }
        if matches!(ids, Ids::Serial) {
            serials.push(
                returned
                    .iter()
                    .map(|r| r.try_get(0))
                    .collect::<Result<_, _>>()?,
            );
        } else {
            uuids.push(
                returned
                    .iter()
                    .map(|r| r.try_get(0))
                    .collect::<Result<_, _>>()?,
            );
        }
    }
    // The sender claims in the order the send records arrive: page by page.
    let started = Instant::now();
    let claim_sql =
        format!("UPDATE {table} SET status = 'SENDING' WHERE id = ANY($1) AND status = 'QUEUED'");
    let mut claimed = 0;
    for page in &serials {
        for chunk in page.chunks(CLAIM) {
            claimed += client.execute(&claim_sql, &[&chunk]).await?;
        }
    }
    for page in &uuids {
        for chunk in page.chunks(CLAIM) {
            claimed += client.execute(&claim_sql, &[&chunk]).await?;
        }
    }
    anyhow::ensure!(
        claimed as usize == pages * PAGE,
        "claimed {claimed} of {}",
        pages * PAGE
    );
    let claim = started.elapsed();
    let size_mb: f64 = client
        .query_one(
            &format!("SELECT pg_total_relation_size('{table}')::float8 / 1e6"),
            &[],
        )
        .await?
        .try_get(0)?;
    client.batch_execute(&format!("DROP TABLE {table}")).await?;
    Ok(Figures {
        insert,
        last_pages,
        claim,
        size_mb,
    })
}

pub async fn ids(settings: Settings, rows: usize) -> anyhow::Result<()> {
    let scratch = Scratch::new(settings).await?;
    let result = async {
        let pool = ese::db::pool(&scratch.settings.database)?;
        let client = pool.get().await?;
        println!("ids: {rows} messages in pages of {PAGE}, then claimed by id in batches of {CLAIM}");
        let mut serial = None;
        for ids in [Ids::Serial, Ids::RandomUuid, Ids::EngineV7] {
            let f = run_one(&client, ids, rows).await?;
            let rate = |d: Duration| rows as f64 / d.as_secs_f64();
            let base = *serial.get_or_insert((rate(f.insert), rate(f.claim)));
            println!(
                "  {:<11} insert {:>8.0} rows/s ({:>3.0}% of BIGSERIAL), last 10 pages {:>6.1} ms/page, claim {:>8.0} rows/s ({:>3.0}%), table+indexes {:>6.0} MB",
                format!("{ids:?}"),
                rate(f.insert),
                100.0 * rate(f.insert) / base.0,
                f.last_pages.as_secs_f64() * 1e3 / 10.0,
                rate(f.claim),
                100.0 * rate(f.claim) / base.1,
                f.size_mb
            );
        }
        anyhow::Ok(())
    }
    .await;
    scratch.cleanup().await?;
    result
}
