-- Run once by the postgres image on an empty data directory (/docker-entrypoint-initdb.d).
-- One database per service, each owned by its own role: a service can reach only its own
-- database (no shared tables, no reading another service's data).
-- The passwords are for the local compose stack only; they match the DATABASE_URLs in
-- docker-compose.yml. Point the services at your own PostgreSQL for anything else
-- (see deploy/README.md).
-- LC_COLLATE 'C': identifiers (ids, idempotency keys) compare as bytes. Under any other
-- collation (the image's default is en_US.utf8) PostgreSQL compares index entries through
-- strcoll instead of memcmp on every insert of ingested usage; see
-- libs/runtime/billstream_runtime/db.py (collation).

CREATE ROLE billstream_ingestion LOGIN PASSWORD 'billstream_ingestion';
CREATE DATABASE billstream_ingestion OWNER billstream_ingestion
    TEMPLATE template0 ENCODING 'UTF8' LOCALE_PROVIDER libc LC_COLLATE 'C';
REVOKE ALL ON DATABASE billstream_ingestion FROM PUBLIC;

CREATE ROLE billstream_metering LOGIN PASSWORD 'billstream_metering';
CREATE DATABASE billstream_metering OWNER billstream_metering
    TEMPLATE template0 ENCODING 'UTF8' LOCALE_PROVIDER libc LC_COLLATE 'C';
REVOKE ALL ON DATABASE billstream_metering FROM PUBLIC;

CREATE ROLE billstream_subscription LOGIN PASSWORD 'billstream_subscription';
CREATE DATABASE billstream_subscription OWNER billstream_subscription
    TEMPLATE template0 ENCODING 'UTF8' LOCALE_PROVIDER libc LC_COLLATE 'C';
REVOKE ALL ON DATABASE billstream_subscription FROM PUBLIC;

CREATE ROLE billstream_invoicing LOGIN PASSWORD 'billstream_invoicing';
CREATE DATABASE billstream_invoicing OWNER billstream_invoicing
    TEMPLATE template0 ENCODING 'UTF8' LOCALE_PROVIDER libc LC_COLLATE 'C';
REVOKE ALL ON DATABASE billstream_invoicing FROM PUBLIC;

CREATE ROLE billstream_payments LOGIN PASSWORD 'billstream_payments';
CREATE DATABASE billstream_payments OWNER billstream_payments
    TEMPLATE template0 ENCODING 'UTF8' LOCALE_PROVIDER libc LC_COLLATE 'C';
REVOKE ALL ON DATABASE billstream_payments FROM PUBLIC;

CREATE ROLE billstream_webhook_dispatch LOGIN PASSWORD 'billstream_webhook_dispatch';
CREATE DATABASE billstream_webhook_dispatch OWNER billstream_webhook_dispatch
    TEMPLATE template0 ENCODING 'UTF8' LOCALE_PROVIDER libc LC_COLLATE 'C';
REVOKE ALL ON DATABASE billstream_webhook_dispatch FROM PUBLIC;
