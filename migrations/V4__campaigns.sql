-- Campaigns: what the admin API, the fan-out and the scheduler need.

-- The state a campaign was paused from, so `resume` returns to it.
ALTER TABLE campaigns ADD COLUMN paused_from TEXT
    CONSTRAINT campaigns_paused_from CHECK (paused_from IN ('DRAFT', 'READY', 'RUNNING'));

-- Fan-out pages: a page's messages are committed, then its send records are
-- produced, then the page is marked done. `pending_to` is the last user id of
-- a page whose sends may be partly produced; `pending_offsets` the end offsets
-- of the send topic's partitions taken before producing it, from which a
-- resumed fan-out reads what already went out, so nothing is produced twice.
ALTER TABLE fanout_progress ADD COLUMN pending_to BIGINT;
ALTER TABLE fanout_progress ADD COLUMN pending_offsets JSONB;
ALTER TABLE fanout_progress ADD COLUMN sends_produced BIGINT NOT NULL DEFAULT 0;
-- Recipients skipped, by reason ({"missing variable first_name": 3}).
ALTER TABLE fanout_progress ADD COLUMN skipped_reasons JSONB NOT NULL DEFAULT '{}'::jsonb;
ALTER TABLE fanout_progress ADD COLUMN started_at TIMESTAMPTZ NOT NULL DEFAULT now();
ALTER TABLE fanout_progress ADD COLUMN finished_at TIMESTAMPTZ;

-- Segment filters compare dates stored as text; a value that is not a date is
-- simply not before or after anything.
CREATE FUNCTION ese_try_timestamptz(t text) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN t::timestamptz;
EXCEPTION WHEN others THEN
    RETURN NULL;
END
$$;
