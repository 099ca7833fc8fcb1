//! The calls of the SQL functions in `sql/functions/`, one constant each, so
//! every caller runs the same text.

/// `ese_apply_receipts(sids)`: folds every receipt of the SIDs into its
/// message; one row per message whose row changed: (message id, old status,
/// new status, sent at, delivered at).
pub const APPLY_RECEIPTS: &str = "SELECT message_id, old_status, new_status, sent_at, delivered_at FROM ese_apply_receipts($1::text[])";

/// `ese_receipts_stored(sids)`: whether any of the SIDs has a status
/// callback stored (one that beat the sender's write of its SID).
pub const RECEIPTS_STORED: &str = "SELECT ese_receipts_stored($1::text[])";

/// `ese_apply_consent(phones, channels, states, at, sources, keywords, event
/// ids)`: consent decisions by event time, every one kept in
/// `consent_events`; a decision with a channel is that channel's alone.
const APPLY_CONSENT: &str = "SELECT ese_apply_consent($1::text[], $2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::text[], $7::text[])";

/// One consent decision for `apply_consent`.
pub struct ConsentDecision<'a> {
    pub phone: &'a str,
    /// The channel the decision is scoped to (`consent.stop-scope =
    /// "channel"`); `None`: the person's overall state, every channel.
    pub channel: Option<crate::model::Channel>,
    pub state: crate::model::ConsentState,
    pub at: chrono::DateTime<chrono::Utc>,
    pub source: &'a str,
    pub keyword: Option<&'a str>,
    pub event_id: &'a str,
}

/// Applies consent decisions, in rounds so a phone appears once per call.
pub async fn apply_consent(
    tx: &deadpool_postgres::Transaction<'_>,
    decisions: impl IntoIterator<Item = ConsentDecision<'_>>,
) -> Result<(), tokio_postgres::Error> {
    let apply = tx.prepare_cached(APPLY_CONSENT).await?;
    for round in super::rounds(decisions.into_iter().map(|d| (d.phone, d))) {
        let p: Vec<&str> = round.iter().map(|d| d.phone).collect();
        let c: Vec<Option<crate::model::Channel>> = round.iter().map(|d| d.channel).collect();
        let s: Vec<crate::model::ConsentState> = round.iter().map(|d| d.state).collect();
        let t: Vec<chrono::DateTime<chrono::Utc>> = round.iter().map(|d| d.at).collect();
        let src: Vec<&str> = round.iter().map(|d| d.source).collect();
        let k: Vec<Option<&str>> = round.iter().map(|d| d.keyword).collect();
        let e: Vec<&str> = round.iter().map(|d| d.event_id).collect();
        tx.execute(&apply, &[&p, &c, &s, &t, &src, &k, &e]).await?;
    }
    Ok(())
}

/// Marks the recipients of messages `$1` unreachable on their channel when
/// the message failed with one of codes `$2` (the provider's "cannot be
/// reached on this channel", `twilio::errors::not_on_channel`), until they
/// write on it again.
pub const MARK_UNREACHABLE: &str = "
INSERT INTO user_channels AS uc (phone_number, channel, unreachable_at, unreachable_code)
SELECT m.recipient_phone, m.channel, now(), m.error_code FROM messages m
 WHERE m.id = ANY($1::uuid[]) AND m.error_code = ANY($2::int[])
 ORDER BY 1, 2
ON CONFLICT (phone_number, channel) DO UPDATE
   SET unreachable_at = EXCLUDED.unreachable_at, unreachable_code = EXCLUDED.unreachable_code";
