-- The database refuses JSON of the wrong shape where the data model needs
-- an object: a person's attributes (and their times), a template's
-- defaults, and the provider's payloads kept in the audit trail. (Filters,
-- variables and content variables were constrained in V8 and V10.)
ALTER TABLE users ADD CONSTRAINT users_attributes_object CHECK (jsonb_typeof(attributes) = 'object');
ALTER TABLE users ADD CONSTRAINT users_attribute_times_object CHECK (jsonb_typeof(attribute_times) = 'object');
ALTER TABLE templates ADD CONSTRAINT templates_defaults_object CHECK (jsonb_typeof(defaults) = 'object');
ALTER TABLE delivery_receipts ADD CONSTRAINT delivery_receipts_raw_payload_object CHECK (jsonb_typeof(raw_payload) = 'object');
ALTER TABLE inbound_events ADD CONSTRAINT inbound_events_raw_payload_object CHECK (jsonb_typeof(raw_payload) = 'object');
