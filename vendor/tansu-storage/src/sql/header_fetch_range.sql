-- -*- mode: sql; sql-product: postgres; -*-
-- Copyright ⓒ 2024-2025 Peter Morgan <peter.james.morgan@gmail.com>
--
-- Licensed under the Apache License, Version 2.0 (the "License");
-- you may not use this file except in compliance with the License.
-- You may obtain a copy of the License at
--
-- http://www.apache.org/licenses/LICENSE-2.0
--
-- Unless required by applicable law or agreed to in writing, software
-- distributed under the License is distributed on an "AS IS" BASIS,
-- WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
-- See the License for the specific language governing permissions and
-- limitations under the License.

-- ese patch: the headers of every record of a fetch (offsets $4 to $5),
-- in one query, in the order they were written.

select

h.offset_id, h.k, h.v

from

cluster c
join topic t on t.cluster = c.id
join topition tp on tp.topic = t.id
join header h on h.topition = tp.id

where

c.name = $1
and t.name = $2
and tp.partition = $3
and h.offset_id >= $4
and h.offset_id <= $5

order by h.offset_id, h.rowid;
