-- The live definition of ese_apply_consent (first defined in migrations; changed only here).
-- Records consent decisions (one per phone per call) and applies those newer
-- than the consent they replace. An unknown number is created with the state
-- its decision implies (UNKNOWN overall when the decision is a channel's).
-- At equal times OPT_OUT wins. A decision already recorded (same source
-- event id) changes nothing, so replays are no-ops.
--
-- A decision without a channel is the person's overall state
-- (users.consent_state) and replaces the older decisions of their channels;
-- one with a channel (consent.stop-scope = "channel") is that channel's
-- alone (user_channels.consent_state) and applies only when newer than both
-- the channel's last decision and the overall one.
CREATE OR REPLACE FUNCTION ese_apply_consent(phones text[], channels text[], states text[], ats timestamptz[],
                                  sources text[], keywords text[], event_ids text[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    created text[];
BEGIN
    WITH c AS (
        INSERT INTO users (phone_e164, consent_state)
        SELECT p, CASE WHEN ch IS NULL THEN s ELSE 'UNKNOWN' END
          FROM unnest(phones, channels, states) AS x(p, ch, s)
        ON CONFLICT (phone_e164) DO NOTHING
        RETURNING phone_e164
    )
    SELECT coalesce(array_agg(phone_e164), '{}') INTO created FROM c;

    INSERT INTO user_channels (phone_number, channel)
    SELECT p, ch FROM unnest(phones, channels) AS x(p, ch) WHERE ch IS NOT NULL
    ORDER BY p, ch
    ON CONFLICT (phone_number, channel) DO NOTHING;

    WITH x AS (
        SELECT * FROM unnest(phones, channels, states, ats, sources, keywords, event_ids)
            AS x(phone, channel, state, at, source, keyword, event_id)
    ), cur AS (
        -- The state a decision replaces and when it was decided.
        SELECT x.phone,
               CASE WHEN x.phone = ANY (created) AND x.channel IS NULL THEN NULL
                    ELSE coalesce(uc.consent_state, u.consent_state) END AS state,
               CASE WHEN x.channel IS NULL THEN u.consent_updated_at
                    ELSE GREATEST(u.consent_updated_at, uc.consent_updated_at) END AS updated_at
          FROM x JOIN users u ON u.phone_e164 = x.phone
          LEFT JOIN user_channels uc ON uc.phone_number = x.phone AND uc.channel = x.channel
         ORDER BY x.phone
           FOR UPDATE OF u
    ), ins AS (
        INSERT INTO consent_events (phone_number, channel, old_state, new_state, source, keyword,
                                    source_event_id, occurred_at, applied)
        SELECT x.phone, x.channel, cur.state, x.state, x.source, x.keyword, x.event_id, x.at,
               cur.updated_at IS NULL OR cur.updated_at < x.at
               -- A tie goes to stopping: a STOP and a START at the same time
               -- leave the number opted out, whichever is applied first.
               OR (cur.updated_at = x.at AND x.state = 'OPT_OUT')
          FROM x JOIN cur ON cur.phone = x.phone
        ON CONFLICT (source_event_id) DO NOTHING
        RETURNING phone_number, channel, new_state, occurred_at, applied
    ), overall AS (
        UPDATE users u
           SET consent_state = ins.new_state, consent_updated_at = ins.occurred_at, last_updated = now()
          FROM ins
         WHERE ins.applied AND ins.channel IS NULL AND u.phone_e164 = ins.phone_number
        RETURNING u.phone_e164 AS phone_number, ins.occurred_at
    ), superseded AS (
        UPDATE user_channels uc SET consent_state = NULL, consent_updated_at = NULL
          FROM overall
         WHERE uc.phone_number = overall.phone_number AND uc.consent_updated_at <= overall.occurred_at
    )
    UPDATE user_channels uc
       SET consent_state = ins.new_state, consent_updated_at = ins.occurred_at
      FROM ins
     WHERE ins.applied AND ins.channel IS NOT NULL
       AND uc.phone_number = ins.phone_number AND uc.channel = ins.channel;
END
$$;
