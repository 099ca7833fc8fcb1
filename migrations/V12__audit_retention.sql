-- Retention of the audit trail (`retention.audit`, seven years): the
-- scheduler and `ese retention` delete expired delivery_receipts and
-- inbound_events in short batches, each `SET LOCAL ese.retention = 'on'`.
--
-- Deletion is now checked once per statement instead of once per row (a
-- batch of 10,000 rows paid 10,000 trigger calls), and TRUNCATE is refused
-- too: it would empty the audit trail in one stroke. UPDATE stays checked
-- per row (an inbound event's processing state may change).
DROP TRIGGER delivery_receipts_immutable ON delivery_receipts;
DROP TRIGGER inbound_events_immutable ON inbound_events;
CREATE TRIGGER delivery_receipts_immutable BEFORE UPDATE ON delivery_receipts
    FOR EACH ROW EXECUTE FUNCTION ese_audit_immutable();
CREATE TRIGGER inbound_events_immutable BEFORE UPDATE ON inbound_events
    FOR EACH ROW EXECUTE FUNCTION ese_audit_immutable();

CREATE FUNCTION ese_audit_retention_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('ese.retention', true) = 'on' THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION '% is an audit trail: its rows are never changed or deleted (retention removes them when they expire)',
        TG_TABLE_NAME
        USING ERRCODE = 'P0001';
END
$$;
CREATE TRIGGER delivery_receipts_retention_only BEFORE DELETE OR TRUNCATE ON delivery_receipts
    FOR EACH STATEMENT EXECUTE FUNCTION ese_audit_retention_only();
CREATE TRIGGER inbound_events_retention_only BEFORE DELETE OR TRUNCATE ON inbound_events
    FOR EACH STATEMENT EXECUTE FUNCTION ese_audit_retention_only();
