-- The live definition of ese_receipts_stored (changed only here).
-- Whether any of `sids` has a status callback stored: the sender asks it
-- after writing SIDs, to fold only when a callback beat its answer (nearly
-- never). Always answered from idx_delivery_receipts_message_sid: the body
-- is planned with sequential scans off, because a plain `… LIMIT 1` walked
-- the table whenever the statistics put many rows on each SID (the e2e
-- bench's, 2026-12-01: ~200 a SID) — and found none, since these SIDs are
-- new: 59 ms a call, the costliest statement of a 100,000 campaign.
CREATE OR REPLACE FUNCTION ese_receipts_stored(sids text[]) RETURNS boolean
LANGUAGE sql STABLE SET enable_seqscan = off AS $$
    SELECT EXISTS (SELECT 1 FROM delivery_receipts d WHERE d.message_sid = ANY (sids))
$$;
