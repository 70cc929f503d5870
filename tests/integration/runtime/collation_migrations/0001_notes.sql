-- A table of the service's own, as every service has.
CREATE TABLE IF NOT EXISTS notes (note_id text PRIMARY KEY);
