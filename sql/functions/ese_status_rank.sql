-- The live definition of ese_status_rank (first defined in migrations; changed only here).
-- How far along a message is; a message never moves to a lower rank.
-- Between outcomes the best known one wins (READ > DELIVERED > UNDELIVERED > FAILED).
CREATE OR REPLACE FUNCTION ese_status_rank(s text) RETURNS int LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE s
        WHEN 'QUEUED' THEN 0 WHEN 'SENDING' THEN 1 WHEN 'SENT' THEN 2
        WHEN 'FAILED' THEN 3 WHEN 'UNDELIVERED' THEN 4 WHEN 'DELIVERED' THEN 5 WHEN 'READ' THEN 6
        ELSE -1 END
$$;
