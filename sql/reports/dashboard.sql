-- System health metrics
SELECT 
  (SELECT COUNT(*) FROM campaigns WHERE status IN ('READY', 'RUNNING')) as active_campaigns,
  (SELECT COUNT(*) FROM users WHERE consent_state = 'OPT_IN') as opted_in_users,
  (SELECT COUNT(*) FROM messages WHERE created_at >= CURRENT_DATE AND status = 'DELIVERED') as delivered_today,
  (SELECT COUNT(*) FROM inbound_events WHERE received_at >= CURRENT_TIMESTAMP - INTERVAL '1 hour') as recent_inbound;
