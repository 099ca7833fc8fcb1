-- The live definition of ese_campaign_pending (changed only here).
-- Whether campaign `c` still has a message that is not final (QUEUED,
-- SENDING or SENT). Always answered from idx_messages_campaign: the body is
-- planned with sequential scans off, because the planner otherwise walks
-- the table whenever the statistics say such rows are common (a campaign
-- under way, few campaigns in the table) and the walk finds none exactly
-- when the campaign is nearly done: the scheduler's check of a 100,000
-- campaign read 200,000 rows, 180 ms, every second in the e2e bench.
CREATE OR REPLACE FUNCTION ese_campaign_pending(c uuid) RETURNS boolean
LANGUAGE sql STABLE SET enable_seqscan = off AS $$
    SELECT EXISTS (SELECT 1 FROM messages m
                    WHERE m.campaign_id = c AND m.status IN ('QUEUED', 'SENDING', 'SENT'))
$$;
