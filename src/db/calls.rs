//! The calls of the SQL functions in `sql/functions/`, one constant each, so
//! every caller runs the same text.

/// `ese_apply_receipts(sids)`: folds every receipt of the SIDs into its
/// message; one row per message whose row changed: (message id, old status,
/// new status, sent at, delivered at).
pub const APPLY_RECEIPTS: &str = "SELECT message_id, old_status, new_status, sent_at, delivered_at FROM ese_apply_receipts($1::text[])";

/// `ese_apply_consent(phones, states, at, sources, keywords, event ids)`:
/// consent decisions by event time, every one kept in `consent_events`.
pub const APPLY_CONSENT: &str = "SELECT ese_apply_consent($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::text[], $6::text[])";

/// Marks the recipients of messages `$1` unreachable on their channel when
/// the message failed with one of codes `$2` (the provider's "cannot be
/// reached on this channel", `twilio::errors::not_on_channel`), until they
/// write on it again.
pub const MARK_UNREACHABLE: &str = "
INSERT INTO user_channels AS uc (phone_number, channel, unreachable_at, unreachable_code)
SELECT m.recipient_phone, m.channel, now(), m.error_code FROM messages m
 WHERE m.id = ANY($1::bigint[]) AND m.error_code = ANY($2::int[])
 ORDER BY 1, 2
ON CONFLICT (phone_number, channel) DO UPDATE
   SET unreachable_at = EXCLUDED.unreachable_at, unreachable_code = EXCLUDED.unreachable_code";
