"""Pooled connections go back to the pool without a reset query (db._no_session_state), which
is safe only while no code leaves session state on them. This reads the services' and libs'
source for what would: a session `SET`/`RESET`/`DISCARD`/`set_config(…, false)`, `LISTEN`
(or asyncpg's add_listener), a session advisory lock, a temporary table, a cursor WITH HOLD.
The places allowed one hold it on a connection of their own, or close the connection
afterwards (db.migrate). Migration files are not read: they run on that closed connection."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]

#: file (relative to ROOT) → why it may
ALLOWED_SESSION_LOCKS = {
    "libs/runtime/billstream_runtime/db.py": "migrate: its connection is closed afterwards",
    "libs/messaging/billstream_messaging/relay.py": "the relay's own connection "
                                                    "(asyncpg.connect), not pooled",
}
#: … and LISTEN through asyncpg's add_listener
ALLOWED_LISTENERS = {
    "libs/messaging/billstream_messaging/relay.py": "the relay's own connection",
    "services/webhook_dispatch/billstream_webhook_dispatch/tasks.py": "asyncpg.connect",
    "services/payments/billstream_payments/tasks.py": "asyncpg.connect",
}

# a statement that starts the string or follows a `;`
_SESSION_STATEMENT = re.compile(
    r"(^|;)\s*(SET\s+(?!LOCAL\b)|RESET\b|DISCARD\b|LISTEN\b|DECLARE\b[^;]*\bWITH\s+HOLD\b"
    r"|CREATE\s+(GLOBAL\s+|LOCAL\s+)?TEMP(ORARY)?\s+TABLE\b)",
    re.IGNORECASE)
_SESSION_LOCK = re.compile(r"pg_(try_)?advisory_lock(_shared)?\s*\(", re.IGNORECASE)
_SESSION_SETTING = re.compile(r"set_config\s*\([^)]*,\s*(false|'f')\s*\)", re.IGNORECASE)


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


def _listener_calls(path: Path) -> list[int]:
    tree = ast.parse(path.read_text(), str(path))
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "add_listener"]


def test_no_source_sets_session_state_on_a_connection():
    found = []
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        for line, text in _strings(path):
            if _SESSION_STATEMENT.search(text) or _SESSION_SETTING.search(text):
                found.append(f"{rel}:{line}: {text.strip()[:60]}")
            if _SESSION_LOCK.search(text) and rel not in ALLOWED_SESSION_LOCKS:
                found.append(f"{rel}:{line}: {text.strip()[:60]}")
        if rel not in ALLOWED_LISTENERS:
            found += [f"{rel}:{line}: add_listener" for line in _listener_calls(path)]
    assert not found, ("session state on a connection that may be pooled (use SET LOCAL, "
                       "pg_advisory_xact_lock, or a connection of its own):\n"
                       + "\n".join(found))


def test_the_check_sees_what_it_looks_for(tmp_path: Path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""Set up and reset: a docstring."""\n'
        'q1 = "SET statement_timeout = 0"\n'
        'q2 = "SET LOCAL lock_timeout = 1"\n'
        'q3 = "SELECT pg_advisory_lock($1)"\n'
        'q4 = "UPDATE t SET a = 1"\n'
        'q5 = "SELECT pg_advisory_xact_lock($1)"\n'
        'q6 = "SELECT 1; set search_path = x"\n'
        'q7 = "CREATE TEMP TABLE t (i int)"\n'
        'q8 = "DECLARE c CURSOR WITH HOLD FOR SELECT 1"\n'
        "q9 = \"SELECT set_config('a.b', 'c', false)\"\n"
        "q10 = \"SELECT set_config('a.b', 'c', true)\"\n"
        "conn.add_listener('chan', print)\n")
    strings = dict(_strings(sample))
    assert 1 not in strings  # the docstring
    flagged = {line for line, text in strings.items()
               if _SESSION_STATEMENT.search(text) or _SESSION_SETTING.search(text)
               or _SESSION_LOCK.search(text)}
    assert flagged == {2, 4, 7, 8, 9, 10}
    assert _listener_calls(sample) == [12]
