//! `users`: profile upserts from producers → `users`, phone normalized to
//! E.164, attributes merged key by key; an older event never overwrites a
//! newer value (per-attribute event times, see `ese_merge_attributes`).

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;

use crate::codec::Codec;
use crate::phone::Normalizer;
use crate::runner::{Collector, InRecord, Item, Stage, StageError};

pub use crate::records::UserUpsert;

const UPSERT: &str = "
INSERT INTO users AS u (phone_number, attributes, attribute_times, updated_at)
SELECT p, a, ese_merge_attribute_times('{}'::jsonb, a, t), t
  FROM unnest($1::text[], $2::jsonb[], $3::timestamptz[]) AS x(p, a, t)
ON CONFLICT (phone_number) DO UPDATE SET
    attributes = ese_merge_attributes(u.attributes, u.attribute_times, EXCLUDED.attributes, EXCLUDED.updated_at),
    attribute_times = ese_merge_attribute_times(u.attribute_times, EXCLUDED.attributes, EXCLUDED.updated_at),
    updated_at = GREATEST(u.updated_at, EXCLUDED.updated_at)";

/// The users stage.
pub struct Users {
    pub codec: Codec,
    pub phones: Normalizer,
}

impl Stage for Users {
    type Input = UserUpsert;

    fn name(&self) -> &'static str {
        "users"
    }

    async fn decode(&self, record: &InRecord) -> Result<UserUpsert, StageError> {
        Ok(self.codec.decode(record.payload()).await?)
    }

    async fn process(
        &self,
        tx: &Transaction<'_>,
        batch: &[Item<UserUpsert>],
        out: &mut Collector,
    ) -> Result<(), StageError> {
        let mut rows = Vec::with_capacity(batch.len());
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
            let attrs = serde_json::Value::Object(u.attributes.clone().into_iter().collect());
            rows.push((phone.clone(), (phone, attrs, at)));
        }
        let stmt = tx.prepare_cached(UPSERT).await?;
        for round in crate::db::rounds(rows) {
            let (phones, (attrs, times)): (Vec<_>, (Vec<_>, Vec<_>)) =
                round.into_iter().map(|(p, a, t)| (p, (a, t))).unzip();
            tx.execute(&stmt, &[&phones, &attrs, &times]).await?;
        }
        Ok(())
    }
}
