-- The live definition of ese_apply_receipts (first defined in migrations; changed only here).
-- Folds every receipt of `sids` into its message: status by rank, first
-- sent/delivered/read times (sent_at never after delivered_at), error code of
-- the latest failure. Used by the receipts stage and by the sender when it
-- writes a SID, so a receipt that raced the sender is applied the moment the
-- SID exists. A receipt whose SID no message has yet is parked in
-- receipts_unmatched. Keeps each recipient's last_message_delivered.
-- Returns the messages whose row changed.
CREATE OR REPLACE FUNCTION ese_apply_receipts(sids text[])
RETURNS TABLE (message_id uuid, old_status text, new_status text, sent_at timestamptz, delivered_at timestamptz)
LANGUAGE sql AS $$
    WITH agg AS (
        SELECT d.message_sid AS sid,
               min(d.received_at) AS first_received,
               (array_agg(ese_receipt_message_status(d.message_status)
                    ORDER BY ese_status_rank(ese_receipt_message_status(d.message_status)) DESC, d.received_at, d.event_id)
                    FILTER (WHERE ese_receipt_message_status(d.message_status) IS NOT NULL))[1] AS best,
               min(d.received_at) FILTER (WHERE d.message_status IN ('sent', 'delivered', 'read', 'undelivered')) AS first_sent,
               min(d.received_at) FILTER (WHERE d.message_status IN ('delivered', 'read')) AS first_delivered,
               min(d.received_at) FILTER (WHERE d.message_status = 'read') AS first_read,
               (array_agg(d.error_code ORDER BY d.received_at DESC, d.event_id DESC)
                    FILTER (WHERE d.message_status IN ('failed', 'undelivered') AND d.error_code IS NOT NULL))[1] AS err
          FROM delivery_receipts d
         WHERE d.message_sid = ANY (sids)
         GROUP BY d.message_sid
    ), next AS (
        SELECT m.id, a.sid, m.status AS old_status,
               CASE WHEN a.best IS NOT NULL AND ese_status_rank(a.best) > ese_status_rank(m.status)
                    THEN a.best ELSE m.status END AS status,
               least(m.delivered_at, a.first_delivered) AS delivered_at,
               least(m.read_at, a.first_read) AS read_at,
               least(m.sent_at, a.first_sent, least(m.delivered_at, a.first_delivered)) AS sent_at,
               a.err
          FROM messages m JOIN agg a ON a.sid = m.provider_sid
    ), parked AS (
        INSERT INTO receipts_unmatched (message_sid, first_received_at)
        SELECT a.sid, a.first_received FROM agg a
         WHERE NOT EXISTS (SELECT 1 FROM next n WHERE n.sid = a.sid)
        ON CONFLICT (message_sid) DO NOTHING
    ), unparked AS (
        DELETE FROM receipts_unmatched u USING next n WHERE u.message_sid = n.sid
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
        RETURNING m.id, n.old_status, m.status, m.sent_at, m.delivered_at, m.recipient_phone
    ), delivered_to AS (
        -- The person's last message delivered (an interaction figure).
        UPDATE users u SET last_message_delivered = x.at
          FROM (SELECT recipient_phone, max(delivered_at) AS at FROM changed
                 WHERE delivered_at IS NOT NULL GROUP BY recipient_phone) x
         WHERE u.phone_e164 = x.recipient_phone
           AND (u.last_message_delivered IS NULL OR u.last_message_delivered < x.at)
    )
    SELECT id, old_status, status, sent_at, delivered_at FROM changed;
$$;
