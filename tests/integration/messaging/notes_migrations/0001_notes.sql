CREATE TABLE notes (id text PRIMARY KEY, tenant_id text NOT NULL, body text NOT NULL);
CREATE TABLE note_counts (tenant_id text PRIMARY KEY, n int NOT NULL);
