-- The sender: deferred messages wait in Postgres, claimed ones are reconciled.

-- A QUEUED message with parked_until is held: quiet hours, a retry delay, or
-- its campaign paused. The sender's pump puts it back on the send topic once
-- parked_until has passed and its campaign is RUNNING.
ALTER TABLE messages ADD COLUMN parked_until TIMESTAMPTZ;
ALTER TABLE messages ADD COLUMN parked_reason TEXT;
-- When the row was claimed (QUEUED → SENDING) before the provider call; a row
-- left SENDING is looked up at the provider, never blindly sent again.
ALTER TABLE messages ADD COLUMN claimed_at TIMESTAMPTZ;

CREATE INDEX messages_parked_idx ON messages (parked_until) WHERE parked_until IS NOT NULL;
CREATE INDEX messages_sending_idx ON messages (claimed_at) WHERE status = 'SENDING';
-- The send record's kind (campaign, reply, opt_out_confirmation) while held.
ALTER TABLE messages ADD COLUMN send_kind TEXT;
