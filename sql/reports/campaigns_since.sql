-- Campaign delivery metrics for campaigns created since $1: the data
-- model's query (campaign_performance.sql) counted per message. Joined
-- straight to its receipts, a message counts once per callback (sent, then
-- delivered, and again for each duplicate the provider sends), so the
-- model's COUNT(m.id) and AVG grow with the callbacks. Here each message
-- counts once, delivered when it has a `delivered` receipt, and its
-- delivery time is its first `delivered` receipt after it was sent.
WITH per_message AS (
    SELECT m.campaign_id, m.id, m.sent_at,
           min(dr.received_at) FILTER (WHERE dr.message_status = 'delivered') AS delivered_at
      FROM campaigns c
      JOIN messages m ON c.id = m.campaign_id
      LEFT JOIN delivery_receipts dr ON m.provider_sid = dr.message_sid
     WHERE c.created_at >= $1
     GROUP BY m.campaign_id, m.id, m.sent_at
)
SELECT c.id, c.name, c.status, c.created_at,
       count(p.id) AS total_sent,
       count(p.delivered_at) AS delivered,
       avg(extract(epoch FROM (p.delivered_at - p.sent_at)) / 60)::float8 AS avg_delivery_time_mins
  FROM campaigns c
  JOIN per_message p ON p.campaign_id = c.id
 GROUP BY c.id, c.name, c.status, c.created_at
 ORDER BY c.created_at DESC, c.id DESC;
