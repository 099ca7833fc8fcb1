//! `users`: profile upserts from producers → `users`, phone normalized to
//! E.164, attributes merged key by key; an older event never overwrites a
//! newer value (per-attribute event times, see `ese_merge_attributes`).
//! Consent a record states is a decision like a keyword's, by event time
//! (`ese_apply_consent`, source `profile`); without one a new profile gets
//! the data model's default, `OPT_IN`, and an existing one keeps its own.

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;

use crate::db::calls::{ConsentDecision, apply_consent};
use crate::model::ConsentState;
use crate::phone::Normalizer;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::runner::{Collector, Deps, Item, Stage, StageError};

pub use crate::records::UserUpsert;

const UPSERT: &str = "
INSERT INTO users AS u (phone_e164, attributes, attribute_times, last_updated)
SELECT p, a, at, t
  FROM unnest($1::text[], $2::jsonb[], $3::jsonb[], $4::timestamptz[]) AS x(p, a, at, t)
ON CONFLICT (phone_e164) DO UPDATE SET
    attributes = ese_merge_attributes(u.attributes, u.attribute_times, EXCLUDED.attributes, EXCLUDED.last_updated),
    attribute_times = ese_merge_attribute_times(u.attribute_times, EXCLUDED.attributes, EXCLUDED.last_updated),
    last_updated = GREATEST(u.last_updated, EXCLUDED.last_updated)";

/// The users stage.
pub struct Users {
    pub phones: Normalizer,
}

/// The stage, until `shutdown`.
pub fn start(deps: Deps, shutdown: CancellationToken) -> BoxFuture<'static, anyhow::Result<()>> {
    Box::pin(async move {
        let phones = Normalizer::new(&deps.settings.phone.default_region);
        deps.consume("users", Users { phones }, shutdown).await
    })
}

impl Stage for Users {
    type Input = UserUpsert;

    async fn process(
        &self,
        tx: &Transaction<'_>,
        batch: &[Item<UserUpsert>],
        out: &mut Collector,
    ) -> Result<(), StageError> {
        let mut rows = Vec::with_capacity(batch.len());
        let mut decisions = Vec::new();
        for (i, item) in batch.iter().enumerate() {
            let u = &item.value;
            let phone = match self.phones.e164(&u.phone) {
                Ok(p) => p,
                Err(e) => {
                    out.dead_letter(i, e.to_string());
                    continue;
                }
            };
            let Some(at) = DateTime::<Utc>::from_timestamp_millis(u.occurred_at) else {
                out.dead_letter(i, format!("occurred_at {} is out of range", u.occurred_at));
                continue;
            };
            match u.consent.as_deref().map(str::parse::<ConsentState>) {
                None => {}
                Some(Ok(state @ (ConsentState::OptIn | ConsentState::OptOut))) => {
                    // Stable across redeliveries of the record.
                    let event = match &u.event_id {
                        Some(id) => format!("profile:{id}"),
                        None => format!(
                            "profile:{}/{}@{}",
                            item.record.topic, item.record.partition, item.record.offset
                        ),
                    };
                    decisions.push((phone.clone(), state, at, event));
                }
                Some(_) => {
                    out.dead_letter(
                        i,
                        format!(
                            "consent {:?} is not OPT_IN or OPT_OUT (null leaves it unchanged)",
                            u.consent.as_deref().unwrap_or_default()
                        ),
                    );
                    continue;
                }
            }
            let attrs = serde_json::Value::Object(u.attributes.clone().into_iter().collect());
            // A new row's attribute times (an existing row's are merged in SQL).
            let stamp = serde_json::Value::String(at.to_rfc3339());
            let times = serde_json::Value::Object(
                u.attributes
                    .keys()
                    .map(|k| (k.clone(), stamp.clone()))
                    .collect(),
            );
            rows.push((phone.clone(), (phone, attrs, times, at)));
        }
        // Stated consent first, so a new profile is created with it.
        apply_consent(
            tx,
            decisions
                .iter()
                .map(|(phone, state, at, event)| ConsentDecision {
                    phone,
                    channel: None,
                    state: *state,
                    at: *at,
                    source: "profile",
                    keyword: None,
                    event_id: event,
                }),
        )
        .await?;
        let stmt = tx.prepare_cached(UPSERT).await?;
        for round in crate::db::rounds(rows) {
            let mut cols = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (p, a, t, at) in round {
                cols.0.push(p);
                cols.1.push(a);
                cols.2.push(t);
                cols.3.push(at);
            }
            tx.execute(&stmt, &[&cols.0, &cols.1, &cols.2, &cols.3])
                .await?;
        }
        Ok(())
    }
}
