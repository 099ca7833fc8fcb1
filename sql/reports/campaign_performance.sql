-- Campaign delivery metrics
SELECT 
  c.name,
  COUNT(m.id) as total_sent,
  COUNT(CASE WHEN dr.message_status = 'delivered' THEN 1 END) as delivered,
  AVG(EXTRACT(EPOCH FROM (dr.received_at - m.sent_at))/60) as avg_delivery_time_mins
FROM campaigns c
JOIN messages m ON c.id = m.campaign_id
LEFT JOIN delivery_receipts dr ON m.provider_sid = dr.message_sid
WHERE c.created_at >= CURRENT_DATE - INTERVAL '30 days'
GROUP BY c.id, c.name;
