//! `fanout`: a campaign's audience → `messages` rows (QUEUED) and one send
//! record per message on `sends`.
//!
//! Commands on `campaigns.commands` only wake the [`Driver`]; the campaign's
//! status in Postgres decides what runs. The driver takes each RUNNING
//! campaign whose fan-out is unfinished (one process per campaign, by an
//! advisory lock) and walks its audience in keyset pages of users:
//!
//! 1. one transaction: the page's users, their rendered messages inserted
//!    (`ON CONFLICT (campaign_id, recipient_phone)` returns the existing row),
//!    and the page marked pending with the send topic's end offsets;
//! 2. the page's send records produced and acknowledged;
//! 3. the page marked done (`fanout_progress.last_user_id`, a `users.seq`).
//!
//! A crash between 1 and 3 leaves the page pending: the next run reads the
//! send topic from the recorded offsets and produces only the messages not
//! already there. So after any crash there is exactly one message row and one
//! send record per recipient. Pause or cancel stops the walk at the next page;
//! resume continues it. Memory is one page, whatever the audience size.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

use deadpool_postgres::{Pool, Transaction};
use futures::future::BoxFuture;
use metrics::{counter, histogram};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::campaigns::{segment, template};
use crate::codec::Codec;
use crate::kafka::{Producer, TopicReader};
use crate::model::{CampaignStatus, SendKind};
use crate::records::{CampaignCommand, SendRequest};
use crate::runner::{Collector, Deps, Item, Stage, StageError};

/// Advisory lock namespace of fan-outs (xor-ed with the campaign id's halves).
const LOCK_NS: i64 = 0x6573_6566_0000_0000;

/// The advisory lock of campaign `id`'s fan-out. Two campaigns sharing a
/// key (one chance in 2^64) would only take turns.
fn lock_key(id: Uuid) -> i64 {
    let (hi, lo) = id.as_u64_pair();
    LOCK_NS ^ (hi ^ lo) as i64
}

/// The stage: wakes the driver once the command's transaction is committed.
pub struct Fanout {
    pub wake: Arc<Notify>,
}

/// The stage and its [`Driver`], until `shutdown`.
pub fn start(deps: Deps, shutdown: CancellationToken) -> BoxFuture<'static, anyhow::Result<()>> {
    Box::pin(async move {
        let wake = Arc::new(Notify::new());
        let settings = &deps.settings;
        let driver = Driver {
            pool: deps.pool.clone(),
            producer: deps.producer.clone(),
            codec: deps.codec.clone(),
            reader: TopicReader::new(&settings.kafka)?,
            sends_topic: deps.output(NAME, "sends")?,
            page_size: settings.campaigns.fanout_page_size,
            max_depth: settings.campaigns.max_filter_depth,
            produce_timeout: settings.kafka.produce_timeout,
            poll: settings.campaigns.scheduler_interval,
            wake: wake.clone(),
        };
        let stop = shutdown.child_token();
        let driving = tokio::spawn(driver.run(stop.clone()));
        let result = deps.consume(NAME, Fanout { wake }, shutdown).await;
        stop.cancel();
        let _ = driving.await;
        result
    })
}

/// The stage's name: its pipeline is `pipelines/fanout.toml`.
const NAME: &str = "fanout";

impl Stage for Fanout {
    type Input = CampaignCommand;

    async fn process(
        &self,
        tx: &Transaction<'_>,
        batch: &[Item<CampaignCommand>],
        out: &mut Collector,
    ) -> Result<(), StageError> {
        let ids: Vec<Uuid> = batch.iter().map(|i| i.value.campaign_id).collect();
        // The issuer publishes before it commits; FOR SHARE waits for that commit.
        let found: HashSet<Uuid> = tx
            .query(
                "SELECT id FROM campaigns WHERE id = ANY($1) FOR SHARE",
                &[&ids],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for (i, item) in batch.iter().enumerate() {
            let c = &item.value;
            if found.contains(&c.campaign_id) {
                counter!(crate::metrics::names::FANOUT_COMMANDS_TOTAL, "command" => c.command.as_str()).increment(1);
            } else {
                out.dead_letter(i, format!("unknown campaign {}", c.campaign_id));
            }
        }
        self.wake.notify_one();
        Ok(())
    }
}

/// Walks RUNNING campaigns' audiences page by page.
pub struct Driver {
    pub pool: Pool,
    pub producer: Producer,
    pub codec: Codec,
    pub reader: TopicReader,
    pub sends_topic: String,
    pub page_size: i64,
    pub max_depth: usize,
    pub produce_timeout: Duration,
    /// How often to look for work without a wake-up.
    pub poll: Duration,
    pub wake: Arc<Notify>,
}

const WORK: &str = "
SELECT c.id FROM campaigns c JOIN fanout_progress f ON f.campaign_id = c.id
 WHERE c.status = 'RUNNING' AND NOT f.finished ORDER BY c.id";

const CAMPAIGN: &str = "
SELECT t.content, t.defaults, t.channel, s.filter_criteria, t.content_sid, t.content_variables FROM campaigns c
  JOIN templates t ON t.id = c.template_id JOIN segments s ON s.id = c.segment_id
 WHERE c.id = $1";

const PROGRESS: &str = "
SELECT last_user_id, pending_to, pending_offsets, skipped_reasons
  FROM fanout_progress WHERE campaign_id = $1";

const INSERT: &str = "
INSERT INTO messages (id, campaign_id, recipient_phone, channel, rendered_content, content_sid, content_variables)
SELECT x.id, $1, x.p, $2, x.b, $5, x.v
  FROM unnest($7::uuid[], $3::text[], $4::text[], $6::jsonb[]) AS x(id, p, b, v)
ON CONFLICT (campaign_id, recipient_phone) DO UPDATE SET campaign_id = EXCLUDED.campaign_id
RETURNING id, recipient_phone, rendered_content";

const PENDING: &str = "
UPDATE fanout_progress SET pending_to = $2, pending_offsets = coalesce(pending_offsets, $3),
                           updated_at = now()
 WHERE campaign_id = $1";

const PAGE_DONE: &str = "
UPDATE fanout_progress
   SET last_user_id = $2,
       pending_to = CASE WHEN pending_to = $2 THEN NULL ELSE pending_to END,
       pending_offsets = CASE WHEN pending_to = $2 THEN NULL ELSE pending_offsets END,
       messages_created = messages_created + $3, sends_produced = sends_produced + $4,
       skipped = skipped + $5, skipped_reasons = $6, updated_at = now()
 WHERE campaign_id = $1";

const FINISHED: &str = "
UPDATE fanout_progress SET finished = true, finished_at = now(), updated_at = now()
 WHERE campaign_id = $1";

/// A page looks at most this many pages' worth of `seq` (a sparse audience
/// gives smaller pages; a page never reads more than this many users).
const WINDOW_PAGES: i64 = 8;

/// A page written to Postgres whose send records are still to be produced.
struct Page {
    /// Last user id the page covers.
    end: i64,
    users: usize,
    created: i64,
    skipped: i64,
    /// (message id, recipient, body) not yet on the send topic.
    messages: Vec<(Uuid, String, String)>,
}

/// What a campaign's pages are built from.
struct Plan {
    id: Uuid,
    template: template::Template,
    defaults: serde_json::Map<String, serde_json::Value>,
    channel: crate::model::Channel,
    /// The template's approved content (ContentSid) and the variable that
    /// fills each numbered one, for WhatsApp.
    content_sid: Option<String>,
    content_variables: Vec<String>,
    page_sql: String,
    filter: segment::Compiled,
}

impl Driver {
    /// Runs until `shutdown`; failures are logged and the work retried.
    pub async fn run(self, shutdown: CancellationToken) {
        crate::periodic::Task::every(
            "fan-out",
            crate::metrics::names::FANOUT_ERRORS_TOTAL,
            self.poll,
        )
        .woken_by(self.wake.clone())
        .run(shutdown.clone(), || self.pass(&shutdown))
        .await
    }

    /// Fans out every campaign that needs it and no other process holds.
    /// One that fails (a stored segment or template that no longer parses,
    /// say) is logged with its id and retried on the next pass; the others
    /// go on (ids are time-ordered, so an old broken campaign would otherwise
    /// hold up every newer one).
    async fn pass(&self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut client = self.pool.get().await?;
        let mut failed = None;
        let ids: Vec<Uuid> = client
            .query(WORK, &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for id in ids {
            if shutdown.is_cancelled() {
                break;
            }
            let key = lock_key(id);
            let locked: bool = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
                .await?
                .get(0);
            if !locked {
                continue;
            }
            let result = self.campaign(&mut client, id, shutdown).await;
            client
                .execute("SELECT pg_advisory_unlock($1)", &[&key])
                .await?;
            if let Err(e) = result {
                tracing::warn!(campaign = %id, error = %e, "fan-out of this campaign failed; the others go on");
                failed.get_or_insert(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    async fn plan(&self, client: &deadpool_postgres::Client, id: Uuid) -> anyhow::Result<Plan> {
        let row = client
            .query_opt(CAMPAIGN, &[&id])
            .await?
            .ok_or_else(|| anyhow::anyhow!("campaign {id} vanished"))?;
        let body: String = row.get(0);
        let defaults: serde_json::Value = row.get(1);
        let filter: serde_json::Value = row.get(3);
        let template = template::parse(&body)
            .map_err(|e| anyhow::anyhow!("campaign {id}: stored template: {e}"))?;
        let node = segment::parse(&filter, self.max_depth)
            .map_err(|e| anyhow::anyhow!("campaign {id}: stored segment: {e}"))?;
        let filter = segment::compile(&node, "u", 4);
        let channel: crate::model::Channel = row.get(2);
        // Opted in on the campaign's channel, as `ese_consent_on` reads it
        // (the channel's own decision, else the overall state), written as
        // two hashed lookups of the few channel decisions: the function's
        // subquery per row costs ~4 µs (0.4 s per 100,000 people), a join
        // ~30 ms per page, these nothing measurable. The channel is one of
        // the enum's fixed names, so it is written in the text; the
        // filter's values are parameters from $4.
        //
        // The page walks a window of `seq` (the subquery, kept apart from the
        // filter by `OFFSET 0`): a segment on an attribute value newer than
        // the table's statistics is estimated at a handful of rows, and the
        // planner then read the whole segment through the GIN index and
        // sorted it for every page (0.14–0.28 s a page of a 100,000 segment,
        // O(segment × pages)); a window bounds each page whatever the plan.
        let page_sql = format!(
            "SELECT u.seq, u.phone_e164, u.attributes
               FROM (SELECT * FROM users WHERE seq > $1 AND seq <= $2 ORDER BY seq OFFSET 0) u
              WHERE ((u.consent_state = 'OPT_IN' AND u.phone_e164 NOT IN (
                        SELECT uc.phone_number FROM user_channels uc
                         WHERE uc.channel = '{c}' AND uc.consent_state = 'OPT_OUT'))
                     OR u.phone_e164 IN (
                        SELECT uc.phone_number FROM user_channels uc
                         WHERE uc.channel = '{c}' AND uc.consent_state = 'OPT_IN'))
                AND {}
              ORDER BY u.seq LIMIT $3",
            filter.sql,
            c = channel.as_str(),
        );
        Ok(Plan {
            id,
            template,
            defaults: match defaults {
                serde_json::Value::Object(m) => m,
                _ => Default::default(),
            },
            channel,
            content_sid: row.get(4),
            content_variables: serde_json::from_value(row.get(5)).map_err(|e| {
                anyhow::anyhow!("campaign {id}: stored template content_variables: {e}")
            })?,
            page_sql,
            filter,
        })
    }

    /// Fans out one campaign until its audience is exhausted or it leaves
    /// RUNNING. Page N's send records are produced while page N+1's rows are
    /// written; page N is marked done before page N+1 is produced.
    async fn campaign(
        &self,
        client: &mut deadpool_postgres::Client,
        id: Uuid,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<()> {
        let plan = self.plan(client, id).await?;
        let started = Instant::now();
        let mut total = 0usize;
        info!(campaign = %id, "fan-out running");
        let progress = client.query_one(PROGRESS, &[&id]).await?;
        let mut cursor: i64 = progress.get(0);
        let mut reasons: BTreeMap<String, i64> =
            serde_json::from_value(progress.get(3)).unwrap_or_default();
        // A page left pending by a crash is redone whole first.
        let mut redo: Option<(i64, Vec<(i32, i64)>)> = match progress.get::<_, Option<i64>>(1) {
            Some(to) => Some((
                to,
                progress
                    .get::<_, Option<serde_json::Value>>(2)
                    .map(serde_json::from_value)
                    .transpose()?
                    .unwrap_or_default(),
            )),
            None => None,
        };
        let mut in_flight: Option<Page> = None;
        loop {
            let status: Option<CampaignStatus> = client
                .query_opt("SELECT status FROM campaigns WHERE id = $1", &[&id])
                .await?
                .map(|r| r.get(0));
            let stop = status != Some(CampaignStatus::Running) || shutdown.is_cancelled();
            let next = if stop {
                None
            } else {
                let redoing = redo.take();
                let overlapping = in_flight.is_some() || redoing.is_some();
                let prepare =
                    self.prepare(client, &plan, cursor, redoing, overlapping, &mut reasons);
                match in_flight.take() {
                    Some(page) => {
                        let (produced, prepared) =
                            tokio::join!(self.produce(&plan, &page), prepare);
                        self.done(client, id, &page, produced?, &reasons).await?;
                        prepared?
                    }
                    None => prepare.await?,
                }
            };
            if let Some(page) = in_flight.take() {
                let produced = self.produce(&plan, &page).await?;
                self.done(client, id, &page, produced, &reasons).await?;
            }
            if stop {
                info!(campaign = %id, status = ?status, recipients = total, "fan-out stopped");
                return Ok(());
            }
            match next {
                Some(page) => {
                    total += page.users;
                    cursor = page.end;
                    in_flight = Some(page);
                }
                None => {
                    client.execute(FINISHED, &[&id]).await?;
                    let secs = started.elapsed().as_secs_f64();
                    info!(campaign = %id, recipients = total, secs, "fan-out finished");
                    return Ok(());
                }
            }
        }
    }

    /// Writes the next page's messages after `cursor` (or redoes a pending
    /// page up to `redo.0`) and marks it pending; `None` when the audience is
    /// exhausted. `overlapping`: an earlier page's sends may still be in
    /// flight, so the earlier start offsets are kept.
    async fn prepare(
        &self,
        client: &mut deadpool_postgres::Client,
        plan: &Plan,
        cursor: i64,
        redo: Option<(i64, Vec<(i32, i64)>)>,
        overlapping: bool,
        reasons: &mut BTreeMap<String, i64>,
    ) -> anyhow::Result<Option<Page>> {
        let id = plan.id;
        let tx = client.transaction().await?;
        let (users, end) = match &redo {
            Some((to, _)) => (self.users(&tx, plan, cursor, *to, i64::MAX).await?, *to),
            None => match self.next_users(&tx, plan, cursor).await? {
                Some(found) => found,
                None => return Ok(None),
            },
        };
        let (mut phones, mut bodies) = (Vec::new(), Vec::new());
        let mut contents: Vec<Option<serde_json::Value>> = Vec::new();
        let mut skipped = 0i64;
        for u in &users {
            let attributes: serde_json::Value = u.get(2);
            let value = |name: &str| {
                attributes
                    .get(name)
                    .and_then(template::attribute_text)
                    .or_else(|| plan.defaults.get(name).and_then(template::attribute_text))
            };
            // The numbered variables of the approved content, `{"1": …}`.
            let content = || -> Result<Option<serde_json::Value>, String> {
                if plan.content_sid.is_none() {
                    return Ok(None);
                }
                let mut vars = serde_json::Map::new();
                for (i, name) in plan.content_variables.iter().enumerate() {
                    let v = value(name).ok_or_else(|| name.clone())?;
                    vars.insert((i + 1).to_string(), serde_json::Value::String(v));
                }
                Ok(Some(serde_json::Value::Object(vars)))
            };
            match plan
                .template
                .render(value)
                .and_then(|b| Ok((b, content()?)))
            {
                Ok((body, content)) => {
                    phones.push(u.get::<_, String>(1));
                    bodies.push(body);
                    contents.push(content);
                }
                Err(var) => {
                    skipped += 1;
                    *reasons
                        .entry(format!("missing variable {var}"))
                        .or_default() += 1;
                    counter!(crate::metrics::names::FANOUT_SKIPPED_TOTAL, "reason" => "missing_variable")
                        .increment(1);
                }
            }
        }
        // UUIDv7 made here: time-ordered like the SQL default, without a
        // function call per row in the database (BENCHMARKS.md "which UUIDs").
        let ids: Vec<Uuid> = phones.iter().map(|_| Uuid::now_v7()).collect();
        let rows = tx
            .query(
                INSERT,
                &[
                    &id,
                    &plan.channel,
                    &phones,
                    &bodies,
                    &plan.content_sid,
                    &contents,
                    &ids,
                ],
            )
            .await?;
        let already = match redo {
            Some((_, offsets)) => {
                tx.commit().await?;
                self.already_sent(id, &offsets).await?
            }
            None => {
                // Keep the earliest offsets while an earlier page is in flight.
                let offsets = if overlapping {
                    None
                } else {
                    Some(serde_json::to_value(
                        self.reader.end_offsets(&self.sends_topic).await?,
                    )?)
                };
                tx.execute(PENDING, &[&id, &end, &offsets]).await?;
                tx.commit().await?;
                HashSet::new()
            }
        };
        let messages = rows
            .iter()
            .map(|m| {
                (
                    m.get::<_, Uuid>(0),
                    m.get::<_, String>(1),
                    m.get::<_, String>(2),
                )
            })
            .filter(|m| !already.contains(&m.0))
            .collect();
        Ok(Some(Page {
            end,
            users: users.len(),
            created: rows.len() as i64,
            skipped,
            messages,
        }))
    }

    /// The audience after `cursor`: at most a page of users and the last
    /// `seq` the page covers, walking windows of `seq` until one has
    /// someone; `None` past the last user.
    async fn next_users(
        &self,
        tx: &Transaction<'_>,
        plan: &Plan,
        mut cursor: i64,
    ) -> anyhow::Result<Option<(Vec<tokio_postgres::Row>, i64)>> {
        let last: i64 = tx
            .query_one("SELECT coalesce(max(seq), 0) FROM users", &[])
            .await?
            .get(0);
        while cursor < last {
            let to = cursor
                .saturating_add(self.page_size.saturating_mul(WINDOW_PAGES))
                .min(last);
            let users = self.users(tx, plan, cursor, to, self.page_size).await?;
            match users.last() {
                // A full page ends at its last user, the rest of the window
                // is the next page's.
                Some(u) if users.len() as i64 >= self.page_size => {
                    let end = u.get(0);
                    return Ok(Some((users, end)));
                }
                Some(_) => return Ok(Some((users, to))),
                None => cursor = to,
            }
        }
        Ok(None)
    }

    /// The campaign's audience with `seq` in (`from`, `to`], at most `limit`.
    async fn users(
        &self,
        tx: &Transaction<'_>,
        plan: &Plan,
        from: i64,
        to: i64,
        limit: i64,
    ) -> anyhow::Result<Vec<tokio_postgres::Row>> {
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&from, &to, &limit];
        params.extend(plan.filter.refs());
        Ok(tx.query(&plan.page_sql, &params).await?)
    }

    /// Produces a page's send records; returns how many were acknowledged.
    async fn produce(&self, plan: &Plan, page: &Page) -> anyhow::Result<i64> {
        let started = Instant::now();
        let sends: Vec<SendRequest> = page
            .messages
            .iter()
            .map(|(message_id, recipient, body)| SendRequest {
                message_id: *message_id,
                campaign_id: Some(plan.id),
                recipient: recipient.clone(),
                channel: plan.channel,
                body: body.clone(),
                attempt: 0,
                kind: SendKind::Campaign,
                not_before: None,
            })
            .collect();
        super::produce_sends(
            &self.producer,
            &self.codec,
            &self.sends_topic,
            &sends,
            self.produce_timeout,
        )
        .await?;
        histogram!(crate::metrics::names::FANOUT_PRODUCE_SECONDS)
            .record(started.elapsed().as_secs_f64());
        Ok(sends.len() as i64)
    }

    /// Marks a produced page done; clears the pending mark when no later page holds it.
    async fn done(
        &self,
        client: &deadpool_postgres::Client,
        id: Uuid,
        page: &Page,
        produced: i64,
        reasons: &BTreeMap<String, i64>,
    ) -> anyhow::Result<()> {
        let reasons = serde_json::to_value(reasons)?;
        client
            .execute(
                PAGE_DONE,
                &[
                    &id,
                    &page.end,
                    &page.created,
                    &produced,
                    &page.skipped,
                    &reasons,
                ],
            )
            .await?;
        counter!(crate::metrics::names::FANOUT_MESSAGES_TOTAL).increment(page.created as u64);
        counter!(crate::metrics::names::FANOUT_SENDS_TOTAL).increment(produced as u64);
        Ok(())
    }

    /// Message ids of campaign `id` already on the send topic after `offsets`.
    async fn already_sent(
        &self,
        id: Uuid,
        offsets: &[(i32, i64)],
    ) -> anyhow::Result<HashSet<Uuid>> {
        let mut found = HashSet::new();
        for payload in self.reader.read_to_end(&self.sends_topic, offsets).await? {
            match self.codec.decode::<SendRequest>(&payload).await {
                Ok(s) if s.campaign_id == Some(id) => {
                    found.insert(s.message_id);
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "undecodable record on the send topic, ignored"),
            }
        }
        info!(
            campaign = %id,
            already = found.len(),
            "resumed a pending fan-out page"
        );
        Ok(found)
    }
}
