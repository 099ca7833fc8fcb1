-- Find users matching segment criteria
SELECT phone_e164, attributes 
FROM users 
WHERE consent_state = 'OPT_IN'
  AND attributes @> '{"city": "San Francisco", "tier": "premium"}';
