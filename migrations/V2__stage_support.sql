-- What the stages need beyond the seed: per-attribute event times so an older
-- upsert never overwrites newer data, consent history, event ids that make
-- every sink write idempotent, and fan-out progress.

-- users: the event time each attribute was last written at ({key: timestamptz}).
ALTER TABLE users ADD COLUMN attribute_times JSONB NOT NULL DEFAULT '{}'::jsonb;

-- Merge `incoming` into `cur` key by key, taking a key only when `at` is newer
-- than the time that key was last written (ties keep the stored value, so a
-- redelivered event changes nothing).
CREATE FUNCTION ese_merge_attributes(cur jsonb, cur_times jsonb, incoming jsonb, at timestamptz)
RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT cur || coalesce(
        (SELECT jsonb_object_agg(key, value) FROM jsonb_each(incoming)
          WHERE cur_times ->> key IS NULL OR (cur_times ->> key)::timestamptz < at),
        '{}'::jsonb)
$$;

CREATE FUNCTION ese_merge_attribute_times(cur_times jsonb, incoming jsonb, at timestamptz)
RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT cur_times || coalesce(
        (SELECT jsonb_object_agg(key, to_jsonb(at)) FROM jsonb_each(incoming)
          WHERE cur_times ->> key IS NULL OR (cur_times ->> key)::timestamptz < at),
        '{}'::jsonb)
$$;

-- Ingestion event ids: a replayed record inserts nothing twice.
ALTER TABLE delivery_receipts ADD COLUMN event_id UUID NOT NULL UNIQUE;
ALTER TABLE delivery_receipts ADD COLUMN phone_valid BOOLEAN NOT NULL DEFAULT true;
ALTER TABLE inbound_events ADD COLUMN event_id UUID NOT NULL UNIQUE;
ALTER TABLE inbound_events ADD COLUMN raw_from TEXT;

-- Consent history: one row per change, never updated or deleted.
CREATE TABLE consent_events (
    id              BIGSERIAL PRIMARY KEY,
    phone_number    TEXT NOT NULL
                    CONSTRAINT consent_events_phone_e164 CHECK (phone_number ~ '^\+[1-9]\d{1,14}$'),
    old_state       TEXT CONSTRAINT consent_events_old_state CHECK (old_state IN ('OPT_IN', 'OPT_OUT')),
    new_state       TEXT NOT NULL CONSTRAINT consent_events_new_state CHECK (new_state IN ('OPT_IN', 'OPT_OUT')),
    source          TEXT NOT NULL CONSTRAINT consent_events_source CHECK (source IN ('keyword', 'provider', 'api')),
    keyword         TEXT,
    source_event_id TEXT NOT NULL UNIQUE,
    occurred_at     TIMESTAMPTZ NOT NULL,
    recorded_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX consent_events_phone_idx ON consent_events (phone_number, occurred_at);

CREATE FUNCTION ese_forbid_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END
$$;
CREATE TRIGGER consent_events_append_only BEFORE UPDATE OR DELETE ON consent_events
    FOR EACH ROW EXECUTE FUNCTION ese_forbid_change();

-- Messages not born of a campaign (auto-replies) are keyed by the event that caused them.
ALTER TABLE messages ADD COLUMN idempotency_key TEXT UNIQUE;
ALTER TABLE messages ADD COLUMN failure_reason TEXT;

-- Fan-out progress: where a crashed fan-out resumes.
CREATE TABLE fanout_progress (
    campaign_id      BIGINT PRIMARY KEY REFERENCES campaigns (id) ON DELETE CASCADE,
    last_user_id     BIGINT NOT NULL DEFAULT 0,
    messages_created BIGINT NOT NULL DEFAULT 0,
    skipped          BIGINT NOT NULL DEFAULT 0,
    finished         BOOLEAN NOT NULL DEFAULT false,
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
