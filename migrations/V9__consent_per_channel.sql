-- Consent per channel, for `consent.stop-scope = "channel"`: a STOP then
-- stops the channel it came on, and the channel keeps its own decision.
-- A channel without one follows the person's overall state
-- (users.consent_state), which is all there is with the default scope
-- ("all"): a STOP on any channel stops every channel.
ALTER TABLE user_channels
    ADD COLUMN consent_state TEXT
        CONSTRAINT user_channels_consent_state CHECK (consent_state IN ('OPT_IN', 'OPT_OUT')),
    ADD COLUMN consent_updated_at TIMESTAMPTZ,
    ADD CONSTRAINT user_channels_consent_dated CHECK ((consent_state IS NULL) = (consent_updated_at IS NULL));

-- The few channel decisions, found without reading every channel row.
CREATE INDEX user_channels_consent_idx ON user_channels (phone_number, channel)
    INCLUDE (consent_state) WHERE consent_state IS NOT NULL;

-- The channel a decision was scoped to; NULL: every channel (the person's
-- overall state).
ALTER TABLE consent_events ADD COLUMN channel TEXT
    CONSTRAINT consent_events_channel CHECK (channel IN ('SMS', 'WHATSAPP'));

-- ese_apply_consent takes each decision's channel now (sql/functions/).
DROP FUNCTION ese_apply_consent(text[], text[], timestamptz[], text[], text[], text[]);
