-- The rest of the data model's ids become UUIDs: templates, segments,
-- campaigns and messages, and every column that refers to them
-- (campaigns.template_id, campaigns.segment_id, messages.campaign_id,
-- fanout_progress.campaign_id). The engine gives every row it writes a
-- UUIDv7 (time-ordered, so each primary key's index grows at its end as a
-- serial's does, and a listing by id is a listing by creation: BENCHMARKS.md
-- "which UUIDs"); the default, for rows written by anyone else, is the data
-- model's gen_random_uuid(). An existing row's id maps
-- as V14's do, ese_legacy_uuid(id), references alike, so every join holds
-- and an old id kept elsewhere (a send record still on a topic, a link in a
-- dashboard) can still be followed. Rewrites the four tables under an
-- exclusive lock.

-- Its definition returns bigint message ids; the live one in
-- sql/functions/ returns uuid, and CREATE OR REPLACE cannot change that.
DROP FUNCTION ese_apply_receipts(text[]);

ALTER TABLE campaigns DROP CONSTRAINT campaigns_template_id_fkey;
ALTER TABLE campaigns DROP CONSTRAINT campaigns_segment_id_fkey;
ALTER TABLE messages DROP CONSTRAINT messages_campaign_id_fkey;
ALTER TABLE fanout_progress DROP CONSTRAINT fanout_progress_campaign_id_fkey;

ALTER TABLE templates ALTER COLUMN id DROP DEFAULT;
ALTER TABLE templates ALTER COLUMN id TYPE uuid USING ese_legacy_uuid(id);
ALTER TABLE templates ALTER COLUMN id SET DEFAULT gen_random_uuid();
DROP SEQUENCE templates_id_seq;

ALTER TABLE segments ALTER COLUMN id DROP DEFAULT;
ALTER TABLE segments ALTER COLUMN id TYPE uuid USING ese_legacy_uuid(id);
ALTER TABLE segments ALTER COLUMN id SET DEFAULT gen_random_uuid();
DROP SEQUENCE segments_id_seq;

ALTER TABLE campaigns ALTER COLUMN id DROP DEFAULT;
ALTER TABLE campaigns
    ALTER COLUMN id TYPE uuid USING ese_legacy_uuid(id),
    ALTER COLUMN template_id TYPE uuid USING ese_legacy_uuid(template_id),
    ALTER COLUMN segment_id TYPE uuid USING ese_legacy_uuid(segment_id);
ALTER TABLE campaigns ALTER COLUMN id SET DEFAULT gen_random_uuid();
DROP SEQUENCE campaigns_id_seq;

ALTER TABLE messages ALTER COLUMN id DROP DEFAULT;
ALTER TABLE messages
    ALTER COLUMN id TYPE uuid USING ese_legacy_uuid(id),
    ALTER COLUMN campaign_id TYPE uuid USING ese_legacy_uuid(campaign_id);
ALTER TABLE messages ALTER COLUMN id SET DEFAULT gen_random_uuid();
DROP SEQUENCE messages_id_seq;

ALTER TABLE fanout_progress
    ALTER COLUMN campaign_id TYPE uuid USING ese_legacy_uuid(campaign_id);

ALTER TABLE campaigns ADD CONSTRAINT campaigns_template_id_fkey
    FOREIGN KEY (template_id) REFERENCES templates (id) ON DELETE SET NULL;
ALTER TABLE campaigns ADD CONSTRAINT campaigns_segment_id_fkey
    FOREIGN KEY (segment_id) REFERENCES segments (id) ON DELETE SET NULL;
ALTER TABLE messages ADD CONSTRAINT messages_campaign_id_fkey
    FOREIGN KEY (campaign_id) REFERENCES campaigns (id) ON DELETE CASCADE;
ALTER TABLE fanout_progress ADD CONSTRAINT fanout_progress_campaign_id_fkey
    FOREIGN KEY (campaign_id) REFERENCES campaigns (id) ON DELETE CASCADE;
