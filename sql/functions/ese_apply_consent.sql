-- The live definition of ese_apply_consent (first defined in migrations; changed only here).
-- Records consent decisions (one per phone per call) and applies those newer
-- than the stored consent. An unknown number is created with the state its
-- decision implies. At equal times OPT_OUT wins. A decision already recorded (same source event id)
-- changes nothing, so replays are no-ops.
CREATE OR REPLACE FUNCTION ese_apply_consent(phones text[], states text[], ats timestamptz[], sources text[],
                                  keywords text[], event_ids text[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    created text[];
BEGIN
    WITH c AS (
        INSERT INTO users (phone_number, consent_state)
        SELECT p, s FROM unnest(phones, states) AS x(p, s)
        ON CONFLICT (phone_number) DO NOTHING
        RETURNING phone_number
    )
    SELECT coalesce(array_agg(phone_number), '{}') INTO created FROM c;

    WITH x AS (
        SELECT * FROM unnest(phones, states, ats, sources, keywords, event_ids) AS x(phone, state, at, source, keyword, event_id)
    ), cur AS (
        SELECT u.phone_number, u.consent_state, u.consent_updated_at
          FROM users u JOIN x ON x.phone = u.phone_number
           FOR UPDATE OF u
    ), ins AS (
        INSERT INTO consent_events (phone_number, old_state, new_state, source, keyword, source_event_id, occurred_at, applied)
        SELECT x.phone,
               CASE WHEN x.phone = ANY (created) THEN NULL ELSE cur.consent_state END,
               x.state, x.source, x.keyword, x.event_id, x.at,
               cur.consent_updated_at IS NULL OR cur.consent_updated_at < x.at
               -- A tie goes to stopping: a STOP and a START at the same time
               -- leave the number opted out, whichever is applied first.
               OR (cur.consent_updated_at = x.at AND x.state = 'OPT_OUT')
          FROM x JOIN cur ON cur.phone_number = x.phone
        ON CONFLICT (source_event_id) DO NOTHING
        RETURNING phone_number, new_state, occurred_at, applied
    )
    UPDATE users u
       SET consent_state = ins.new_state, consent_updated_at = ins.occurred_at, updated_at = now()
      FROM ins
     WHERE ins.applied AND u.phone_number = ins.phone_number;
END
$$;
