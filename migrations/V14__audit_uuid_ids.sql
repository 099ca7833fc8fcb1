-- The audit trail's ids as the data model has them: UUID. New rows get a
-- UUIDv7 from the engine (time-ordered, so the primary key's index grows at
-- its end as a serial's does; BENCHMARKS.md "which UUIDs"), or
-- gen_random_uuid() when written by anyone else. An existing row's id maps
-- deterministically: ese_legacy_uuid(42) = 00000000-0000-8000-8000-00000000002a
-- (version 8, "custom", the old number in its last 48 bits), so a reference
-- kept elsewhere to an old id can still be followed. Rewrites both tables
-- (an exclusive lock for as long: about a minute per 10 million rows here).
CREATE FUNCTION ese_legacy_uuid(id bigint) RETURNS uuid
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    AS $$ SELECT ('00000000-0000-8000-8000-' || lpad(to_hex(id), 12, '0'))::uuid $$;

ALTER TABLE delivery_receipts ALTER COLUMN id DROP DEFAULT;
ALTER TABLE delivery_receipts ALTER COLUMN id TYPE uuid USING ese_legacy_uuid(id);
ALTER TABLE delivery_receipts ALTER COLUMN id SET DEFAULT gen_random_uuid();
DROP SEQUENCE delivery_receipts_id_seq;

ALTER TABLE inbound_events ALTER COLUMN id DROP DEFAULT;
ALTER TABLE inbound_events ALTER COLUMN id TYPE uuid USING ese_legacy_uuid(id);
ALTER TABLE inbound_events ALTER COLUMN id SET DEFAULT gen_random_uuid();
DROP SEQUENCE inbound_events_id_seq;
