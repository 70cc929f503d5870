-- A scope's catalog version (see catalog.py): moved by the catalog consumer, in the same
-- transaction, whenever it writes one of the scope's customers, meters or test clocks. Workers
-- keep what they read about a scope's customers and meters while its version stands. Values
-- come from a sequence: they never repeat, not even after a rebuild empties this table.
CREATE SEQUENCE IF NOT EXISTS catalog_version_seq;
CREATE TABLE IF NOT EXISTS catalog_versions (
    tenant_id   text NOT NULL,
    environment text NOT NULL,
    version     bigint NOT NULL,
    PRIMARY KEY (tenant_id, environment)
);
-- Scopes with a catalog already: a version each, or their workers would keep nothing until
-- their catalog next changes.
INSERT INTO catalog_versions (tenant_id, environment, version)
SELECT tenant_id, environment, nextval('catalog_version_seq')
  FROM (SELECT tenant_id, environment FROM customers
        UNION SELECT tenant_id, environment FROM meters
        UNION SELECT tenant_id, environment FROM test_clocks) AS scopes
ON CONFLICT DO NOTHING;
