-- Receipts: message status as a monotone fold of every receipt for it, so the
-- result is the same whatever order callbacks arrive in and however often
-- they are replayed. Consent: decisions by event time, history kept.

-- How far along a message is; a message never moves to a lower rank.
-- Between outcomes the best known one wins (READ > DELIVERED > UNDELIVERED > FAILED).
CREATE FUNCTION ese_status_rank(s text) RETURNS int LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE s
        WHEN 'QUEUED' THEN 0 WHEN 'SENDING' THEN 1 WHEN 'SENT' THEN 2
        WHEN 'FAILED' THEN 3 WHEN 'UNDELIVERED' THEN 4 WHEN 'DELIVERED' THEN 5 WHEN 'READ' THEN 6
        ELSE -1 END
$$;

-- The message status a receipt status implies (NULL: none, e.g. queued).
CREATE FUNCTION ese_receipt_message_status(s text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE s
        WHEN 'sent' THEN 'SENT' WHEN 'delivered' THEN 'DELIVERED' WHEN 'read' THEN 'READ'
        WHEN 'undelivered' THEN 'UNDELIVERED' WHEN 'failed' THEN 'FAILED'
        ELSE NULL END
$$;

CREATE INDEX delivery_receipts_unlinked_idx ON delivery_receipts (received_at) WHERE message_id IS NULL;

-- Links the receipts of `sids` to their messages (once a message has the SID)
-- and folds them into the message: status by rank, first sent/delivered/read
-- times (sent_at never after delivered_at), error code of the latest failure.
-- Used by the receipts stage and by the sender when it writes a SID, so a
-- receipt that raced the sender is applied the moment the SID exists.
-- Returns the messages whose row changed.
CREATE FUNCTION ese_apply_receipts(sids text[])
RETURNS TABLE (message_id bigint, old_status text, new_status text, sent_at timestamptz, delivered_at timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE delivery_receipts d SET message_id = m.id
      FROM messages m
     WHERE d.message_sid = ANY (sids) AND d.message_id IS NULL AND m.provider_sid = d.message_sid;

    RETURN QUERY
    WITH agg AS (
        SELECT d.message_id AS mid,
               (array_agg(ese_receipt_message_status(d.status)
                    ORDER BY ese_status_rank(ese_receipt_message_status(d.status)) DESC, d.received_at, d.event_id)
                    FILTER (WHERE ese_receipt_message_status(d.status) IS NOT NULL))[1] AS best,
               min(d.received_at) FILTER (WHERE d.status IN ('sent', 'delivered', 'read', 'undelivered')) AS first_sent,
               min(d.received_at) FILTER (WHERE d.status IN ('delivered', 'read')) AS first_delivered,
               min(d.received_at) FILTER (WHERE d.status = 'read') AS first_read,
               (array_agg(d.error_code ORDER BY d.received_at DESC, d.event_id DESC)
                    FILTER (WHERE d.status IN ('failed', 'undelivered') AND d.error_code IS NOT NULL))[1] AS err
          FROM delivery_receipts d
         WHERE d.message_sid = ANY (sids) AND d.message_id IS NOT NULL
         GROUP BY d.message_id
    ), next AS (
        SELECT m.id, m.status AS old_status,
               CASE WHEN a.best IS NOT NULL AND ese_status_rank(a.best) > ese_status_rank(m.status)
                    THEN a.best ELSE m.status END AS status,
               least(m.delivered_at, a.first_delivered) AS delivered_at,
               least(m.read_at, a.first_read) AS read_at,
               least(m.sent_at, a.first_sent, least(m.delivered_at, a.first_delivered)) AS sent_at,
               a.err
          FROM messages m JOIN agg a ON a.mid = m.id
    ), changed AS (
        UPDATE messages m
           SET status = n.status,
               sent_at = n.sent_at,
               delivered_at = n.delivered_at,
               read_at = n.read_at,
               error_code = CASE WHEN n.status IN ('FAILED', 'UNDELIVERED') THEN coalesce(n.err, m.error_code)
                                 ELSE m.error_code END,
               updated_at = now()
          FROM next n
         WHERE m.id = n.id
           AND ese_status_rank(n.status) >= ese_status_rank(m.status)
           AND (m.status, m.sent_at, m.delivered_at, m.read_at) IS DISTINCT FROM
               (n.status, n.sent_at, n.delivered_at, n.read_at)
        RETURNING m.id, n.old_status, m.status, m.sent_at, m.delivered_at
    )
    SELECT * FROM changed;
END
$$;

-- Consent decisions: `applied` is false for a decision older than the one in
-- force (it is kept in the history, and changes nothing).
ALTER TABLE consent_events ADD COLUMN applied BOOLEAN NOT NULL DEFAULT true;

-- Records consent decisions (one per phone per call) and applies those newer
-- than the stored consent. An unknown number is created with the state its
-- decision implies. A decision already recorded (same source event id)
-- changes nothing, so replays are no-ops.
CREATE FUNCTION ese_apply_consent(phones text[], states text[], ats timestamptz[], sources text[],
                                  keywords text[], event_ids text[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    created text[];
BEGIN
    WITH c AS (
        INSERT INTO users (phone_number, consent_state)
        SELECT p, s FROM unnest(phones, states) AS x(p, s)
        ON CONFLICT (phone_number) DO NOTHING
        RETURNING phone_number
    )
    SELECT coalesce(array_agg(phone_number), '{}') INTO created FROM c;

    WITH x AS (
        SELECT * FROM unnest(phones, states, ats, sources, keywords, event_ids) AS x(phone, state, at, source, keyword, event_id)
    ), cur AS (
        SELECT u.phone_number, u.consent_state, u.consent_updated_at
          FROM users u JOIN x ON x.phone = u.phone_number
           FOR UPDATE OF u
    ), ins AS (
        INSERT INTO consent_events (phone_number, old_state, new_state, source, keyword, source_event_id, occurred_at, applied)
        SELECT x.phone,
               CASE WHEN x.phone = ANY (created) THEN NULL ELSE cur.consent_state END,
               x.state, x.source, x.keyword, x.event_id, x.at,
               cur.consent_updated_at IS NULL OR cur.consent_updated_at < x.at
          FROM x JOIN cur ON cur.phone_number = x.phone
        ON CONFLICT (source_event_id) DO NOTHING
        RETURNING phone_number, new_state, occurred_at, applied
    )
    UPDATE users u
       SET consent_state = ins.new_state, consent_updated_at = ins.occurred_at, updated_at = now()
      FROM ins
     WHERE ins.applied AND u.phone_number = ins.phone_number;
END
$$;
