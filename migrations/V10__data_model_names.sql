-- The data model's own names, keys, defaults and indexes (DATA-MODEL.md is
-- the contract analysts and the platform's other services are written
-- against). Nothing is dropped that held data: renamed columns keep their
-- rows, the BIGSERIAL user id stays as `users.seq` for the fan-out's pages.
--
-- Deliberate departures, kept because they are stricter or needed:
-- - timestamps are TIMESTAMPTZ (the model's TIMESTAMP has no zone; the
--   engine's clocks and the provider's are UTC instants);
-- - users.consent_updated_at has no default: it is the event time of the
--   last consent decision, and a default of "now" would make a STOP that
--   happened before the row was created look older than no decision at all;
-- - the GIN index on users.attributes uses jsonb_path_ops (smaller and
--   faster for the `@>` the model's segment query uses).

-- users: phone_e164 is the primary key; the serial id becomes `seq`, the
-- order the fan-out pages the audience in (a bigint keyset is cheaper than
-- text, and a fan-out in flight across this migration resumes where it was).
ALTER TABLE users RENAME COLUMN phone_number TO phone_e164;
ALTER TABLE users RENAME COLUMN updated_at TO last_updated;
ALTER TABLE users RENAME CONSTRAINT users_phone_e164 TO users_phone_e164_format;
ALTER TABLE messages DROP COLUMN user_id;
ALTER TABLE users DROP CONSTRAINT users_pkey;
ALTER TABLE users RENAME COLUMN id TO seq;
ALTER SEQUENCE users_id_seq RENAME TO users_seq_seq;
ALTER TABLE users ADD CONSTRAINT users_seq_key UNIQUE (seq);
ALTER TABLE users DROP CONSTRAINT users_phone_number_key;
ALTER TABLE users ADD CONSTRAINT users_pkey PRIMARY KEY (phone_e164);
ALTER TABLE users ALTER COLUMN phone_e164 TYPE VARCHAR(20);
ALTER INDEX users_attributes_gin RENAME TO idx_users_attributes_gin;
ALTER INDEX users_consent_state_idx RENAME TO idx_users_consent_state;

-- templates: content, variables as a JSON array kept in step with the
-- content, character_count generated from it.
ALTER TABLE templates RENAME COLUMN body TO content;
ALTER TABLE templates RENAME CONSTRAINT templates_body_not_empty TO templates_content_not_empty;
ALTER TABLE templates ALTER COLUMN variables DROP DEFAULT;
ALTER TABLE templates ALTER COLUMN variables TYPE JSONB USING to_jsonb(variables);
ALTER TABLE templates ALTER COLUMN variables SET DEFAULT '[]'::jsonb;
ALTER TABLE templates ADD CONSTRAINT templates_variables_array CHECK (jsonb_typeof(variables) = 'array');
ALTER TABLE templates ADD COLUMN character_count INTEGER GENERATED ALWAYS AS (char_length(content)) STORED;
ALTER TABLE templates ALTER COLUMN name TYPE VARCHAR(255);

-- segments: filter_criteria (a JSON object), estimated_audience_size.
ALTER TABLE segments RENAME COLUMN filter TO filter_criteria;
ALTER TABLE segments ADD CONSTRAINT segments_filter_criteria_object CHECK (jsonb_typeof(filter_criteria) = 'object');
-- Never estimated: 0, the model's default (`least` would skip the NULL).
ALTER TABLE segments ALTER COLUMN estimated_audience_size TYPE INTEGER
    USING least(coalesce(estimated_audience_size, 0), 2147483647)::integer;
ALTER TABLE segments ALTER COLUMN estimated_audience_size SET DEFAULT 0;
ALTER TABLE segments ALTER COLUMN name TYPE VARCHAR(255);

-- campaigns: the model's defaults (1 message per second, quiet hours
-- 22:00-08:00 in the recipient's time).
ALTER TABLE campaigns ALTER COLUMN rate_limit_per_second SET DEFAULT 1;
ALTER TABLE campaigns ALTER COLUMN quiet_hours_start SET DEFAULT '22:00';
ALTER TABLE campaigns ALTER COLUMN quiet_hours_end SET DEFAULT '08:00';
ALTER TABLE campaigns ALTER COLUMN name TYPE VARCHAR(255);

-- messages: rendered_content, the recipient a user.
ALTER TABLE messages RENAME COLUMN body TO rendered_content;
ALTER TABLE messages ALTER COLUMN recipient_phone TYPE VARCHAR(20);
ALTER TABLE messages ALTER COLUMN provider_sid TYPE VARCHAR(50);
-- Every recipient is a person the engine knows; a number without a row
-- (none is expected) becomes one whose consent is unknown, so it is in no
-- campaign audience until it opts in.
INSERT INTO users (phone_e164, consent_state)
SELECT DISTINCT m.recipient_phone, 'UNKNOWN' FROM messages m
 WHERE NOT EXISTS (SELECT 1 FROM users u WHERE u.phone_e164 = m.recipient_phone);
ALTER TABLE messages ADD CONSTRAINT messages_recipient_phone_fkey
    FOREIGN KEY (recipient_phone) REFERENCES users (phone_e164);
ALTER INDEX messages_provider_sid_key RENAME TO idx_messages_provider_sid;
ALTER INDEX messages_campaign_status_idx RENAME TO idx_messages_campaign;
CREATE INDEX idx_messages_recipient ON messages (recipient_phone);
CREATE INDEX idx_messages_status_created ON messages (status, created_at);
DROP INDEX messages_created_at_idx;

-- delivery_receipts: message_status; received_at defaults to now.
ALTER TABLE delivery_receipts RENAME COLUMN status TO message_status;
ALTER TABLE delivery_receipts RENAME CONSTRAINT delivery_receipts_status TO delivery_receipts_message_status;
ALTER TABLE delivery_receipts ALTER COLUMN received_at SET DEFAULT now();
ALTER TABLE delivery_receipts ALTER COLUMN message_sid TYPE VARCHAR(50);
ALTER INDEX delivery_receipts_sid_idx RENAME TO idx_delivery_receipts_message_sid;
CREATE INDEX idx_delivery_receipts_status_received ON delivery_receipts (message_status, received_at);

-- inbound_events: as specified (message_sid may be absent).
ALTER TABLE inbound_events ALTER COLUMN message_sid DROP NOT NULL;
ALTER TABLE inbound_events ALTER COLUMN message_sid TYPE VARCHAR(50);
ALTER TABLE inbound_events ALTER COLUMN received_at SET DEFAULT now();
ALTER INDEX inbound_events_from_idx RENAME TO idx_inbound_events_from_received;

-- Functions that named the old columns are replaced from sql/functions/
-- right after the migrations.
