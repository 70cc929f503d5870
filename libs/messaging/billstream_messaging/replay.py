"""Rebuilding a read model by replay.

`rebuild(pool, consumer, tables)` empties the consumer's read-model tables and its inbox and
bumps its generation: at its next start the consumer joins a fresh consumer group that reads
its topics from the beginning, so the read model is rebuilt from the log. If the broker no
longer holds the whole log (the local broker keeps it in memory), the producing services'
relays republish it from their own event logs.
"""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg


async def rebuild(pool: asyncpg.Pool, consumer: str, tables: Iterable[str]) -> int:
    """Reset `consumer`'s read model; returns its new generation."""
    async with pool.acquire() as conn, conn.transaction():
        for table in tables:
            await conn.execute(f'TRUNCATE TABLE "{table}"')
        await conn.execute("DELETE FROM inbox WHERE consumer = $1", consumer)
        return await conn.fetchval(
            "INSERT INTO consumer_state (consumer, generation) VALUES ($1, 2)"
            " ON CONFLICT (consumer) DO UPDATE SET generation = consumer_state.generation + 1"
            " RETURNING generation",
            consumer,
        )
