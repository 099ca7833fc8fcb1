-- The live definition of ese_merge_attributes (first defined in migrations; changed only here).
-- Merge `incoming` into `cur` key by key, taking a key only when `at` is newer
-- than the time that key was last written (ties keep the stored value, so a
-- redelivered event changes nothing).
CREATE OR REPLACE FUNCTION ese_merge_attributes(cur jsonb, cur_times jsonb, incoming jsonb, at timestamptz)
RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT cur || coalesce(
        (SELECT jsonb_object_agg(key, value) FROM jsonb_each(incoming)
          WHERE cur_times ->> key IS NULL OR (cur_times ->> key)::timestamptz < at),
        '{}'::jsonb)
$$;
