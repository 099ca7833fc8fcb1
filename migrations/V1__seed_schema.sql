-- The seed data model: users, templates, segments, campaigns, messages,
-- delivery_receipts, inbound_events, with the constraints that keep the
-- state machines honest. Later migrations add what the stages need.

CREATE TABLE users (
    id                    BIGSERIAL PRIMARY KEY,
    phone_number          TEXT NOT NULL UNIQUE
                          CONSTRAINT users_phone_e164 CHECK (phone_number ~ '^\+[1-9]\d{1,14}$'),
    attributes            JSONB NOT NULL DEFAULT '{}'::jsonb,
    consent_state         TEXT NOT NULL DEFAULT 'OPT_IN'
                          CONSTRAINT users_consent_state CHECK (consent_state IN ('OPT_IN', 'OPT_OUT')),
    consent_updated_at    TIMESTAMPTZ,
    last_message_received TIMESTAMPTZ,
    created_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at            TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX users_attributes_gin ON users USING GIN (attributes jsonb_path_ops);
CREATE INDEX users_consent_state_idx ON users (consent_state);

CREATE TABLE templates (
    id         BIGSERIAL PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    channel    TEXT NOT NULL DEFAULT 'SMS'
               CONSTRAINT templates_channel CHECK (channel IN ('SMS', 'WHATSAPP')),
    body       TEXT NOT NULL CONSTRAINT templates_body_not_empty CHECK (length(body) > 0),
    variables  TEXT[] NOT NULL DEFAULT '{}',
    defaults   JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE segments (
    id                      BIGSERIAL PRIMARY KEY,
    name                    TEXT NOT NULL UNIQUE,
    description             TEXT,
    filter                  JSONB NOT NULL,
    estimated_audience_size BIGINT,
    estimated_at            TIMESTAMPTZ,
    created_at              TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at              TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE campaigns (
    id                    BIGSERIAL PRIMARY KEY,
    name                  TEXT NOT NULL,
    template_id           BIGINT NOT NULL REFERENCES templates (id) ON DELETE RESTRICT,
    segment_id            BIGINT NOT NULL REFERENCES segments (id) ON DELETE RESTRICT,
    status                TEXT NOT NULL DEFAULT 'DRAFT'
                          CONSTRAINT campaigns_status CHECK (status IN
                              ('DRAFT', 'READY', 'RUNNING', 'PAUSED', 'COMPLETED', 'CANCELLED')),
    rate_limit_per_second INTEGER NOT NULL DEFAULT 10
                          CONSTRAINT campaigns_rate_limit_positive CHECK (rate_limit_per_second > 0),
    quiet_hours_start     TIME,
    quiet_hours_end       TIME,
    schedule_time         TIMESTAMPTZ,
    started_at            TIMESTAMPTZ,
    completed_at          TIMESTAMPTZ,
    created_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT campaigns_quiet_hours_pair CHECK ((quiet_hours_start IS NULL) = (quiet_hours_end IS NULL))
);
CREATE INDEX campaigns_status_idx ON campaigns (status);
CREATE INDEX campaigns_schedule_idx ON campaigns (schedule_time) WHERE status = 'READY';
CREATE INDEX campaigns_template_idx ON campaigns (template_id);
CREATE INDEX campaigns_segment_idx ON campaigns (segment_id);
CREATE INDEX campaigns_created_at_idx ON campaigns (created_at);

CREATE TABLE messages (
    id              BIGSERIAL PRIMARY KEY,
    campaign_id     BIGINT REFERENCES campaigns (id) ON DELETE CASCADE,
    user_id         BIGINT REFERENCES users (id) ON DELETE SET NULL,
    recipient_phone TEXT NOT NULL
                    CONSTRAINT messages_phone_e164 CHECK (recipient_phone ~ '^\+[1-9]\d{1,14}$'),
    channel         TEXT NOT NULL DEFAULT 'SMS'
                    CONSTRAINT messages_channel CHECK (channel IN ('SMS', 'WHATSAPP')),
    body            TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'QUEUED'
                    CONSTRAINT messages_status CHECK (status IN
                        ('QUEUED', 'SENDING', 'SENT', 'DELIVERED', 'READ', 'UNDELIVERED', 'FAILED')),
    provider_sid    TEXT UNIQUE,
    error_code      INTEGER,
    retry_count     INTEGER NOT NULL DEFAULT 0,
    sent_at         TIMESTAMPTZ,
    delivered_at    TIMESTAMPTZ,
    read_at         TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT messages_delivered_after_sent CHECK (delivered_at IS NULL OR sent_at IS NULL OR delivered_at >= sent_at),
    CONSTRAINT messages_campaign_recipient UNIQUE (campaign_id, recipient_phone)
);
CREATE INDEX messages_campaign_status_idx ON messages (campaign_id, status);
CREATE INDEX messages_user_idx ON messages (user_id);
CREATE INDEX messages_created_at_idx ON messages (created_at);

CREATE TABLE delivery_receipts (
    id           BIGSERIAL PRIMARY KEY,
    message_id   BIGINT REFERENCES messages (id) ON DELETE CASCADE,
    message_sid  TEXT NOT NULL,
    status       TEXT NOT NULL
                 CONSTRAINT delivery_receipts_status CHECK (status IN
                     ('accepted', 'scheduled', 'queued', 'sending', 'sent', 'delivered', 'undelivered',
                      'failed', 'read', 'receiving', 'received', 'canceled', 'partially_delivered', 'unknown')),
    error_code   INTEGER,
    raw_payload  JSONB NOT NULL,
    received_at  TIMESTAMPTZ NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX delivery_receipts_sid_idx ON delivery_receipts (message_sid);
CREATE INDEX delivery_receipts_message_idx ON delivery_receipts (message_id);

CREATE TABLE inbound_events (
    id                BIGSERIAL PRIMARY KEY,
    message_sid       TEXT NOT NULL,
    from_phone        TEXT
                      CONSTRAINT inbound_events_from_e164 CHECK (from_phone ~ '^\+[1-9]\d{1,14}$'),
    to_phone          TEXT,
    channel           TEXT NOT NULL DEFAULT 'SMS'
                      CONSTRAINT inbound_events_channel CHECK (channel IN ('SMS', 'WHATSAPP')),
    body              TEXT NOT NULL DEFAULT '',
    raw_payload       JSONB NOT NULL,
    processing_status TEXT NOT NULL DEFAULT 'PENDING'
                      CONSTRAINT inbound_events_processing_status CHECK (processing_status IN
                          ('PENDING', 'PROCESSED', 'FAILED', 'INVALID')),
    received_at       TIMESTAMPTZ NOT NULL,
    processed_at      TIMESTAMPTZ,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX inbound_events_from_idx ON inbound_events (from_phone, received_at);
CREATE INDEX inbound_events_status_idx ON inbound_events (processing_status) WHERE processing_status = 'PENDING';
CREATE INDEX inbound_events_received_idx ON inbound_events (received_at);
