-- The live definition of ese_consent_on (changed only here).
-- A person's consent on one channel: the channel's own decision when one
-- was scoped to it (consent.stop-scope = "channel"), else `overall`, their
-- users.consent_state.
CREATE OR REPLACE FUNCTION ese_consent_on(phone text, chan text, overall text)
RETURNS text LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT uc.consent_state FROM user_channels uc
                      WHERE uc.phone_number = phone AND uc.channel = chan
                        AND uc.consent_state IS NOT NULL), overall)
$$;
