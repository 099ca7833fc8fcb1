-- Consent is explicit, and a message's kind is the database's.
--
-- A number first seen through an inbound message is UNKNOWN until it opts
-- in (START, or a profile upsert that states consent): never in a campaign
-- audience before. Profiles upserted without consent keep the default OPT_IN.
ALTER TABLE users DROP CONSTRAINT users_consent_state,
    ADD CONSTRAINT users_consent_state CHECK (consent_state IN ('OPT_IN', 'OPT_OUT', 'UNKNOWN'));

-- UNCLEAR: a message that mentions an opt-out keyword among other words
-- ("can I cancel my order?"). Kept for the audit trail, never applied.
-- 'profile': consent stated by a users.upserts record.
ALTER TABLE consent_events
    DROP CONSTRAINT consent_events_old_state,
    ADD CONSTRAINT consent_events_old_state CHECK (old_state IN ('OPT_IN', 'OPT_OUT', 'UNKNOWN')),
    DROP CONSTRAINT consent_events_new_state,
    ADD CONSTRAINT consent_events_new_state CHECK (new_state IN ('OPT_IN', 'OPT_OUT', 'UNCLEAR')),
    ADD CONSTRAINT consent_events_unclear_never_applied CHECK (new_state <> 'UNCLEAR' OR NOT applied),
    DROP CONSTRAINT consent_events_source,
    ADD CONSTRAINT consent_events_source CHECK (source IN ('keyword', 'provider', 'api', 'profile'));

-- Why a message exists, written when its row is made and read by the sender
-- from here, never from the Kafka record (which anyone able to produce to
-- the send topic could forge). Rows without a campaign were replies.
ALTER TABLE messages ADD COLUMN kind TEXT NOT NULL DEFAULT 'campaign'
    CONSTRAINT messages_kind CHECK (kind IN ('campaign', 'reply', 'opt_out_confirmation', 'clarification'));
UPDATE messages SET kind = coalesce(send_kind, 'reply') WHERE campaign_id IS NULL;
ALTER TABLE messages DROP COLUMN send_kind;

-- "At most one clarification per number per consent.clarify-interval".
CREATE INDEX messages_clarification_idx ON messages (recipient_phone, created_at)
    WHERE kind = 'clarification';
