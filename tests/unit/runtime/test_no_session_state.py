"""Pooled connections go back to the pool without a reset query (db._no_session_state), which
is safe only while no code leaves session state on them. This reads the services' and libs'
source for the statements that would: a session `SET`/`RESET`/`DISCARD`, `LISTEN`, a
session advisory lock. The places allowed one hold it on a connection of their own, or
release it before the connection goes back (db.migrate)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

#: file (relative to ROOT) → why it may
ALLOWED_SESSION_LOCKS = {
    "libs/runtime/billstream_runtime/db.py": "migrate: unlocked in `finally`, or the "
                                             "connection is closed",
    "libs/messaging/billstream_messaging/relay.py": "the relay's own connection "
                                                    "(asyncpg.connect), not pooled",
}

_SESSION_STATEMENT = re.compile(r"^\s*(SET\s+(?!LOCAL\b)|RESET\b|DISCARD\b|LISTEN\b)",
                                re.IGNORECASE)
_SESSION_LOCK = re.compile(r"pg_(try_)?advisory_lock(_shared)?\s*\(", re.IGNORECASE)


def _sources() -> list[Path]:
    files = []
    for top in ("services", "libs"):
        files += [p for p in (ROOT / top).rglob("*.py") if ".venv" not in p.parts]
    return files


def _strings(path: Path) -> list[tuple[int, str]]:
    """The string literals of a module, docstrings left out."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings]


def test_no_source_sets_session_state_on_a_connection():
    found = []
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        for line, text in _strings(path):
            if _SESSION_STATEMENT.match(text):
                found.append(f"{rel}:{line}: {text.strip()[:60]}")
            if _SESSION_LOCK.search(text) and rel not in ALLOWED_SESSION_LOCKS:
                found.append(f"{rel}:{line}: {text.strip()[:60]}")
    assert not found, ("session state on a connection that may be pooled (use SET LOCAL, "
                       "pg_advisory_xact_lock, or a connection of its own):\n"
                       + "\n".join(found))


def test_the_check_sees_what_it_looks_for(tmp_path: Path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""Set up and reset: a docstring."""\n'
                      'q1 = "SET statement_timeout = 0"\nq2 = "SET LOCAL lock_timeout = 1"\n'
                      'q3 = "SELECT pg_advisory_lock($1)"\nq4 = "UPDATE t SET a = 1"\n'
                      'q5 = "SELECT pg_advisory_xact_lock($1)"\n')
    strings = dict(_strings(sample))
    assert 1 not in strings  # the docstring
    assert _SESSION_STATEMENT.match(strings[2])
    assert not _SESSION_STATEMENT.match(strings[3])
    assert _SESSION_LOCK.search(strings[4])
    assert not _SESSION_STATEMENT.match(strings[5]) and not _SESSION_LOCK.search(strings[5])
    assert not _SESSION_LOCK.search(strings[6])
