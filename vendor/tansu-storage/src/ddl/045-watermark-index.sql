-- ese patch: every produce, fetch and offset lookup finds its partition's
-- watermark by topition.

create index if not exists watermark_topition on watermark (topition);
