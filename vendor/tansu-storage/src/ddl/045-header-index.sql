-- ese patch: fetch reads the headers of every record it returns by
-- (topition, offset_id), and deleting a record cascades to its headers by the
-- same columns; without this index each of those scanned the whole header
-- table (20 ms per record at 220,000 headers), which stalled the storage task
-- for every client once a consumer read a topic with headers.

create index if not exists header_topition_offset_id on header (topition, offset_id);
