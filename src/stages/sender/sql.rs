//! The sender's statements, one constant each.
//!
//! Every statement that changes messages by id compares their status as
//! `m.status || ''`, an expression no index covers, so the rows are always
//! found by id. Compared plainly, `status = 'QUEUED'` lets the planner
//! walk the status index instead whenever its statistics say few rows have
//! that status — which they do for the first minute of every campaign,
//! before autovacuum has analysed its fresh QUEUED rows, and always for
//! SENDING, whose index is mostly dead entries under load — and then each
//! claim compared every queued row with every id of the batch (e2e bench,
//! 2026-12-01: 75 ms a claim of 50, a third of PostgreSQL's time).

pub const LOOKUP: &str = "
SELECT m.id, m.status, m.recipient_phone, m.channel, m.rendered_content, m.retry_count, m.campaign_id,
       c.status, c.rate_limit_per_second, c.quiet_hours_start, c.quiet_hours_end,
       ese_consent_on(m.recipient_phone, m.channel, u.consent_state), u.attributes ->> 'timezone', m.kind,
       m.content_sid, m.content_variables, uc.last_inbound_at
  FROM messages m
  LEFT JOIN campaigns c ON c.id = m.campaign_id
  LEFT JOIN users u ON u.phone_e164 = m.recipient_phone
  LEFT JOIN user_channels uc ON uc.phone_number = m.recipient_phone AND uc.channel = 'WHATSAPP'
 WHERE m.id = ANY($1)";

/// Claims a few messages right before their calls, consent checked again
/// for every message by the kind its row was made with: a campaign message
/// only while its campaign runs and to a number opted in on its channel, a
/// reply or a clarification to anyone not opted out there, an opt-out
/// confirmation always. A
/// pause or an opt-out committed after the batch was looked up still stops
/// the send (within ~100 ms of sends, not after the batch).
pub const CLAIM: &str = "
UPDATE messages m SET status = 'SENDING', claimed_at = now(), updated_at = now(),
                      parked_until = NULL, parked_reason = NULL
 WHERE m.id = ANY($1) AND m.status || '' = 'QUEUED'
   AND (m.campaign_id IS NULL
        OR EXISTS (SELECT 1 FROM campaigns c WHERE c.id = m.campaign_id AND c.status = 'RUNNING'))
   AND CASE m.kind
         WHEN 'opt_out_confirmation' THEN true
         WHEN 'campaign' THEN EXISTS (SELECT 1 FROM users u WHERE u.phone_e164 = m.recipient_phone
                                         AND ese_consent_on(u.phone_e164, m.channel, u.consent_state) = 'OPT_IN')
         ELSE NOT EXISTS (SELECT 1 FROM users u WHERE u.phone_e164 = m.recipient_phone
                             AND ese_consent_on(u.phone_e164, m.channel, u.consent_state) = 'OPT_OUT')
       END
RETURNING id";

pub const PARK: &str = "
UPDATE messages m SET parked_until = x.t, parked_reason = x.r, updated_at = now()
  FROM unnest($1::uuid[], $2::timestamptz[], $3::text[]) AS x(id, t, r)
 WHERE m.id = x.id AND m.status || '' = 'QUEUED'";

pub const FAIL: &str = "
UPDATE messages m SET status = 'FAILED', error_code = x.c, failure_reason = x.r,
                      parked_until = NULL, updated_at = now()
  FROM unnest($1::uuid[], $2::int[], $3::text[]) AS x(id, c, r)
 WHERE m.id = x.id AND m.status || '' IN ('QUEUED', 'SENDING')";

pub const SENT: &str = "
UPDATE messages m SET status = 'SENT', provider_sid = x.sid, sent_at = now(), updated_at = now()
  FROM unnest($1::uuid[], $2::text[]) AS x(id, sid)
 WHERE m.id = x.id AND m.status || '' = 'SENDING'";

pub const REQUEUE: &str = "
UPDATE messages m SET status = 'QUEUED', retry_count = m.retry_count + 1, error_code = x.c,
                      failure_reason = x.r, claimed_at = NULL, updated_at = now()
  FROM unnest($1::uuid[], $2::int[], $3::text[]) AS x(id, c, r)
 WHERE m.id = x.id AND m.status || '' = 'SENDING'";

pub use crate::db::calls::{APPLY_RECEIPTS, RECEIPTS_STORED};
