-- The live definition of ese_receipt_message_status (first defined in migrations; changed only here).
-- The message status a receipt status implies (NULL: none, e.g. queued).
CREATE OR REPLACE FUNCTION ese_receipt_message_status(s text) RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE s
        WHEN 'sent' THEN 'SENT' WHEN 'delivered' THEN 'DELIVERED' WHEN 'read' THEN 'READ'
        WHEN 'undelivered' THEN 'UNDELIVERED' WHEN 'failed' THEN 'FAILED'
        ELSE NULL END
$$;
