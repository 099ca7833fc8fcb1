-- WhatsApp as the channel works: approved templates, the person's 24-hour
-- window, reachability per channel.

-- A template's approved content at the provider (Twilio's Content API,
-- needed for any business-initiated WhatsApp message): its ContentSid, and
-- which of the template's variables fills each numbered one ({{1}} is
-- content_variables[0], ...).
ALTER TABLE templates
    ADD COLUMN content_sid TEXT
        CONSTRAINT templates_content_sid CHECK (content_sid ~ '^HX[0-9a-fA-F]{32}$'),
    ADD COLUMN content_variables JSONB NOT NULL DEFAULT '[]'::jsonb
        CONSTRAINT templates_content_variables_array CHECK (jsonb_typeof(content_variables) = 'array');

-- What a message sends in place of its text when it is an approved
-- template: the ContentSid and the numbered variables as rendered for its
-- recipient ({"1": "Ada"}); the text stays in `body` for the audit trail.
ALTER TABLE messages
    ADD COLUMN content_sid TEXT,
    ADD COLUMN content_variables JSONB
        CONSTRAINT messages_content_variables_object CHECK (jsonb_typeof(content_variables) = 'object');

-- A person on each channel: their last message there (on WhatsApp, the
-- window for free-form messages) and when the provider said they cannot
-- be reached there.
CREATE TABLE user_channels (
    phone_number     TEXT NOT NULL
                     CONSTRAINT user_channels_phone_e164 CHECK (phone_number ~ '^\+[1-9]\d{1,14}$'),
    channel          TEXT NOT NULL CONSTRAINT user_channels_channel CHECK (channel IN ('SMS', 'WHATSAPP')),
    last_inbound_at  TIMESTAMPTZ,
    unreachable_at   TIMESTAMPTZ,
    unreachable_code INTEGER,
    PRIMARY KEY (phone_number, channel)
);
CREATE INDEX user_channels_last_inbound_idx ON user_channels (channel, last_inbound_at);

INSERT INTO user_channels (phone_number, channel, last_inbound_at)
SELECT from_phone, channel, max(received_at) FROM inbound_events
 WHERE from_phone IS NOT NULL GROUP BY from_phone, channel;
