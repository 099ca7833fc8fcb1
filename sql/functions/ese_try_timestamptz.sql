-- The live definition of ese_try_timestamptz (first defined in migrations; changed only here).
-- Segment filters compare dates stored as text; a value that is not a date is
-- simply not before or after anything.
CREATE OR REPLACE FUNCTION ese_try_timestamptz(t text) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN t::timestamptz;
EXCEPTION WHEN others THEN
    RETURN NULL;
END
$$;
