-- The live definition of ese_merge_attribute_times (first defined in migrations; changed only here).
CREATE OR REPLACE FUNCTION ese_merge_attribute_times(cur_times jsonb, incoming jsonb, at timestamptz)
RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT cur_times || coalesce(
        (SELECT jsonb_object_agg(key, to_jsonb(at)) FROM jsonb_each(incoming)
          WHERE cur_times ->> key IS NULL OR (cur_times ->> key)::timestamptz < at),
        '{}'::jsonb)
$$;
