"""The statement Billstream creates its databases with (db.create_database_sql): byte-order
collation, from template0, naming the provider only where the server knows the option."""

from __future__ import annotations

from billstream_runtime.db import create_database_sql


def test_from_postgresql_15_the_libc_provider_is_named() -> None:
    assert create_database_sql("billstream_ingestion", 160004) == (
        'CREATE DATABASE "billstream_ingestion" TEMPLATE template0 ENCODING \'UTF8\''
        " LOCALE_PROVIDER libc LC_COLLATE 'C'")


def test_before_postgresql_15_there_is_no_provider_option() -> None:
    sql = create_database_sql("billstream_ingestion", 140011)
    assert "LOCALE_PROVIDER" not in sql
    assert sql.endswith("TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C'")


def test_the_name_is_quoted_as_an_identifier() -> None:
    assert create_database_sql('odd"name', 160000).startswith('CREATE DATABASE "odd""name" ')
