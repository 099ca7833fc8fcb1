-- The live definition of ese_forbid_change (first defined in migrations; changed only here).
CREATE OR REPLACE FUNCTION ese_forbid_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END
$$;
