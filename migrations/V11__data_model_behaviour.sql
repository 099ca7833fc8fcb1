-- Behaviour the data model states: what deleting a template, segment or
-- campaign does, the message state machine and the immutable audit trail
-- enforced by the database, and per-person interaction figures.

-- A template or segment may be deleted once no active campaign (READY,
-- RUNNING, PAUSED) uses it; a draft or finished campaign keeps its row and
-- its history with the reference cleared, and its messages keep their text.
ALTER TABLE campaigns ALTER COLUMN template_id DROP NOT NULL;
ALTER TABLE campaigns ALTER COLUMN segment_id DROP NOT NULL;
ALTER TABLE campaigns DROP CONSTRAINT campaigns_template_id_fkey;
ALTER TABLE campaigns ADD CONSTRAINT campaigns_template_id_fkey
    FOREIGN KEY (template_id) REFERENCES templates (id) ON DELETE SET NULL;
ALTER TABLE campaigns DROP CONSTRAINT campaigns_segment_id_fkey;
ALTER TABLE campaigns ADD CONSTRAINT campaigns_segment_id_fkey
    FOREIGN KEY (segment_id) REFERENCES segments (id) ON DELETE SET NULL;
ALTER TABLE campaigns ADD CONSTRAINT campaigns_active_has_content
    CHECK (status NOT IN ('READY', 'RUNNING', 'PAUSED') OR (template_id IS NOT NULL AND segment_id IS NOT NULL));

-- The message state machine, enforced on every write: a status moves
-- forward (ese_status_rank) or stays. Deliberate departures from the data
-- model's diagram, each for a reason:
-- - SENDING -> QUEUED: a claimed message that was not sent (a transient
--   provider error, or the provider has no record of it when reconciled)
--   is queued again for its retry;
-- - FAILED -> UNDELIVERED / DELIVERED / READ: the provider's later callback
--   wins over the engine's own verdict (a send that timed out went through);
-- - UNDELIVERED -> DELIVERED / READ: callbacks arrive out of order;
-- - never DELIVERED -> UNDELIVERED: a delivery confirmation is final (a
--   late "undelivered" callback stays in delivery_receipts).
-- A status outside the vocabulary passes through to the CHECK constraint,
-- which names it.
CREATE FUNCTION ese_message_status_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = OLD.status
       OR ese_status_rank(NEW.status) < 0 OR ese_status_rank(OLD.status) < 0
       OR ese_status_rank(NEW.status) > ese_status_rank(OLD.status)
       OR (OLD.status = 'SENDING' AND NEW.status = 'QUEUED') THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'message %: % -> % is not a transition of the message state machine',
        OLD.id, OLD.status, NEW.status
        USING ERRCODE = 'check_violation', CONSTRAINT = 'messages_status_transition';
END
$$;
CREATE TRIGGER messages_status_transition BEFORE UPDATE OF status ON messages
    FOR EACH ROW EXECUTE FUNCTION ese_message_status_transition();

-- The audit trail is immutable: delivery_receipts and inbound_events rows
-- are never changed or deleted, except an inbound event's processing
-- state, and deletion by retention (`SET LOCAL ese.retention = 'on'`).
CREATE FUNCTION ese_audit_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('ese.retention', true) = 'on' THEN
        RETURN OLD;
    END IF;
    IF TG_OP = 'UPDATE' AND TG_TABLE_NAME = 'inbound_events'
       AND to_jsonb(NEW) - 'processing_status' - 'processed_at'
         = to_jsonb(OLD) - 'processing_status' - 'processed_at' THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION '% is an audit trail: its rows are never changed or deleted (retention removes them when they expire)',
        TG_TABLE_NAME
        USING ERRCODE = 'P0001';
END
$$;
CREATE TRIGGER delivery_receipts_immutable BEFORE UPDATE OR DELETE ON delivery_receipts
    FOR EACH ROW EXECUTE FUNCTION ese_audit_immutable();
CREATE TRIGGER inbound_events_immutable BEFORE UPDATE OR DELETE ON inbound_events
    FOR EACH ROW EXECUTE FUNCTION ese_audit_immutable();

-- Each person's interaction figures, usable in segment filters: messages
-- received from them (beside last_message_received) and the last message
-- delivered to them.
ALTER TABLE users ADD COLUMN messages_received INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN last_message_delivered TIMESTAMPTZ;
UPDATE users u SET messages_received = x.n
  FROM (SELECT from_phone, count(*) AS n FROM inbound_events GROUP BY from_phone) x
 WHERE x.from_phone = u.phone_e164;
UPDATE users u SET last_message_delivered = x.t
  FROM (SELECT recipient_phone, max(delivered_at) AS t FROM messages
         WHERE delivered_at IS NOT NULL GROUP BY recipient_phone) x
 WHERE x.recipient_phone = u.phone_e164;
-- ese_apply_receipts keeps last_message_delivered current (sql/functions/).
