"""The `Idempotency-Key` layer for POST requests (an ASGI middleware).

- same key, same request (method, path, query, body; and for a CloudEvent in HTTP binary
  mode, whose attributes travel in `ce-*` headers, those headers and Content-Type): the stored
  response is replayed with `Idempotent-Replayed: true`;
- same key, another request: 422 `idempotency_key_reused`;
- same key while the first request is still running: 409 `idempotency_key_in_use`.

Keys are scoped to the tenant and environment of the API key. The key is reserved in its own
committed row before the handler runs, so a concurrent duplicate sees it. Once the endpoint has
run, its response is stored and replayed whatever it was, a 5xx included (as Stripe does): the
endpoint may have committed its effect before failing, so running it again could apply it twice.
Only refusals that ran nothing (429, 503) release the key, and, on `@rerunnable` routes (below),
a failure (a 5xx, an exception, a cancellation): running those again applies nothing twice, and
a stored 500 would answer every retry with it. A client that disconnects before its body has
arrived runs nothing and reserves nothing.

A key whose request died with its process (a crash, a kill) stays `in_progress`: its effect
may have committed, and running an arbitrary endpoint again could apply it twice, so a retry
is answered 409. Routes whose effect deduplicates itself are marked `@rerunnable` (usage
ingestion: every event carries its own idempotency key, so running a batch again answers
`duplicate` for what was taken). On those, a key held longer than `lease_s` (the service's
`idempotency_lease_s`, longer than requests take) is taken over by the retry, which runs the
endpoint again; before that, the 409 asks to retry in a moment (`Retry-After`, at most 2 s: the
first request may just be finishing). Each holder of a key has its own lease token, so a
request that was slow rather than dead, and finishes after a takeover, neither overwrites the
new holder's answer nor releases its key.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Awaitable, Callable, Iterable

import asyncpg
from starlette.routing import BaseRoute, Match

from billstream_runtime.auth import Authenticator, admin_token_matches, bearer_token
from billstream_runtime.errors import (
    ApiError,
    Conflict,
    InvalidRequest,
    Unprocessable,
    unexpected,
)

MAX_KEY_LENGTH = 255
#: The longest Retry-After of a 409 on a rerunnable route.
_RETRY_IN_S = 2
#: Answers that mean the endpoint did not run: the key is released for a retry.
_NOT_EXECUTED = frozenset({429, 503})
#: The layer reads the body to hash it; larger bodies are refused before they are buffered.
MAX_BODY_BYTES = 10 * 1024 * 1024
#: A response carrying secrets that are shown once (API keys) sets this header: the layer then
#: keeps only the fact that the key was used, never the body, and a retry with the same key is
#: answered 409 `idempotent_replay_unavailable` instead of showing the secrets again.
NO_REPLAY_HEADER = "billstream-no-replay"
_SKIP_HEADERS = {b"content-length", b"date", b"server", b"request-id"}
_RERUNNABLE = "__billstream_rerunnable__"


def rerunnable(endpoint):
    """Mark an endpoint whose effect deduplicates itself, so that running the same request
    again after a crash applies nothing twice: its Idempotency-Key is taken over once the
    lease of a dead request runs out (see the module docstring)."""
    setattr(endpoint, _RERUNNABLE, True)
    return endpoint


def rerunnable_routes(routes: Iterable[BaseRoute]) -> list[BaseRoute]:
    return [r for r in routes if getattr(getattr(r, "endpoint", None), _RERUNNABLE, False)]


class IdempotencyMiddleware:
    def __init__(
        self,
        app,
        *,
        pool: Callable[[], asyncpg.Pool],
        authenticator: Callable[[], Authenticator],
        admin_token: Callable[[], str],
        error_response: Callable[[ApiError], Awaitable[tuple[int, list, bytes]]],
        rerunnable: Callable[[], Iterable[BaseRoute]],
        lease_s: Callable[[], float],
    ) -> None:
        self.app = app
        self._pool = pool
        self._auth = authenticator
        self._admin_token = admin_token
        self._error_response = error_response
        self._rerunnable = rerunnable
        self._lease_s = lease_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        raw_key = headers.get(b"idempotency-key")
        if raw_key is None:
            return await self.app(scope, receive, send)
        try:
            await self._handle(scope, receive, send, headers, raw_key.decode("latin-1"))
        except ApiError as err:
            status, hdrs, body = await self._error_response(err)
            await _send(send, status, hdrs, body)

    async def _handle(self, scope, receive, send, headers, key: str) -> None:
        if not key or len(key) > MAX_KEY_LENGTH:
            raise InvalidRequest(
                "invalid_idempotency_key",
                f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} characters",
                param="Idempotency-Key",
            )
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise _too_large()
        body = await _read_body(receive)
        if body is _DISCONNECTED:  # the client left before its body arrived: nothing ran,
            return  # nothing is reserved, and there is no one to answer
        if body is None:
            raise _too_large()
        token = bearer_token(headers.get(b"authorization", b"").decode("latin-1"))
        if scope["path"].startswith("/admin"):
            if not admin_token_matches(token, self._admin_token()):
                # let the endpoint produce the proper 401
                return await self.app(scope, _replay(body), send)
            tenant, env = "_admin", "live"
        else:
            ctx = await self._auth().authenticate(token)
            tenant, env = ctx.tenant_id, ctx.environment
        request_hash = hash_request(
            scope["method"], scope["path"], scope.get("query_string", b""), body,
            scope["headers"],
        )

        pool = self._pool()
        lease = secrets.token_hex(8)  # this request's hold on the key
        reserved = await pool.fetchval(
            """
            INSERT INTO idempotency_keys (tenant_id, environment, key, request_hash, status,
                                          locked_at, lease_id)
            VALUES ($1, $2, $3, $4, 'in_progress', now(), $5)
            ON CONFLICT (tenant_id, environment, key) DO NOTHING
            RETURNING true
            """,
            tenant, env, key, request_hash, lease,
        )
        if not reserved and self._is_rerunnable(scope):
            reserved = await self._take_over(pool, tenant, env, key, request_hash, lease)
        if not reserved:
            row = await pool.fetchrow(
                "SELECT request_hash, status, response_status, response_headers, response_body,"
                " extract(epoch FROM coalesce(locked_at, created_at)"
                "  + make_interval(secs => $4) - now())::float8 AS lease_left_s"
                " FROM idempotency_keys WHERE tenant_id=$1 AND environment=$2 AND key=$3",
                tenant, env, key, float(self._lease_s()),
            )
            if row is None:  # released between our insert and select: treat as in use
                raise Conflict("idempotency_key_in_use", "A request with this key is in progress")
            if row["request_hash"] != request_hash:
                raise Unprocessable(
                    "idempotency_key_reused",
                    "This Idempotency-Key was used with a different request; use a new key",
                    param="Idempotency-Key",
                )
            if row["status"] == "in_progress":
                raise self._in_use(scope, row)
            if row["response_body"] is None:
                raise Conflict(
                    "idempotent_replay_unavailable",
                    "The first request with this Idempotency-Key succeeded and its response "
                    "held secrets that are shown only once; it cannot be replayed",
                )
            stored = [(k.encode(), v.encode()) for k, v in row["response_headers"]]
            stored.append((b"idempotent-replayed", b"true"))
            return await _send(send, row["response_status"], stored, bytes(row["response_body"]))

        captured: dict = {"status": 500, "headers": [], "body": bytearray(), "status_sent": False}

        async def capture(message):
            if message["type"] == "http.response.start":
                captured["status"] = message["status"]
                captured["status_sent"] = True
                captured["headers"] = message.get("headers", [])
            elif message["type"] == "http.response.body":
                captured["body"] += message.get("body", b"")
            await send(message)

        rerun_safe = self._is_rerunnable(scope)
        try:
            await self.app(scope, _replay(body), capture)
        except BaseException as exc:
            # The endpoint started and may have committed its effect before failing: keep the
            # answer the client gets (the error shape's 500) so that a retry cannot apply it
            # a second time; unless running it again is safe (a rerunnable route), when the
            # key is released for the retry to run it.
            if rerun_safe:
                await self._release(pool, tenant, env, key, lease)
                raise
            if not captured["status_sent"]:  # (the answer the client will get)
                status, headers, error_body = await self._error_response(unexpected(exc))
                captured.update(status=status, headers=headers, body=bytearray(error_body))
            await self._store(pool, tenant, env, key, lease, captured)
            raise
        if captured["status"] in _NOT_EXECUTED or (rerun_safe and captured["status"] >= 500):
            await self._release(pool, tenant, env, key, lease)
            return
        await self._store(pool, tenant, env, key, lease, captured)

    def _is_rerunnable(self, scope) -> bool:
        return any(route.matches(scope)[0] is Match.FULL for route in self._rerunnable())

    async def _take_over(self, pool, tenant, env, key, request_hash, lease) -> bool:
        """Take the key of the same request held past the lease (its request died)."""
        return bool(await pool.fetchval(
            "UPDATE idempotency_keys SET locked_at = now(), lease_id = $6"
            " WHERE tenant_id=$1 AND environment=$2 AND key=$3 AND request_hash=$4"
            " AND status='in_progress'"
            " AND coalesce(locked_at, created_at) < now() - make_interval(secs => $5)"
            " RETURNING true",
            tenant, env, key, request_hash, float(self._lease_s()), lease))

    def _in_use(self, scope, row) -> ApiError:
        if not self._is_rerunnable(scope):
            return Conflict(
                "idempotency_key_in_use",
                "A request with this Idempotency-Key is still in progress; retry later")
        left = max(1, math.ceil(row["lease_left_s"] or 0))
        return Conflict(
            "idempotency_key_in_use",
            "A request with this Idempotency-Key is still in progress; retry in a moment. If "
            f"it died with its process, a retry in {left} s or later runs it again (what it "
            "did is not done twice)",
            headers={"Retry-After": str(min(left, _RETRY_IN_S))})

    @staticmethod
    async def _store(pool, tenant, env, key, lease, captured) -> None:
        kept = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in captured["headers"]
            if k.lower() not in _SKIP_HEADERS
        ]
        secret = any(k.lower() == NO_REPLAY_HEADER.encode() for k, _ in captured["headers"])
        body_to_keep = None if secret else bytes(captured["body"])
        await pool.execute(
            "UPDATE idempotency_keys SET status='done', response_status=$4,"
            " response_headers=$5, response_body=$6"
            " WHERE tenant_id=$1 AND environment=$2 AND key=$3 AND lease_id=$7",
            tenant, env, key, captured["status"], [] if secret else kept, body_to_keep, lease,
        )

    @staticmethod
    async def _release(pool, tenant, env, key, lease) -> None:
        await pool.execute(
            "DELETE FROM idempotency_keys WHERE tenant_id=$1 AND environment=$2 AND key=$3"
            " AND status='in_progress' AND lease_id=$4",
            tenant, env, key, lease,
        )


def hash_request(method: str, path: str, query: bytes, body: bytes,
                 headers: Iterable[tuple[bytes, bytes]] = ()) -> str:
    """What "the same request" means: method, path, query string and body bytes, and the
    `ce-*` headers and Content-Type when there are `ce-*` headers: a CloudEvent in HTTP binary
    mode has its attributes there (its id among them), the body is only its data. A request
    without `ce-*` headers hashes as it always did, so keys stored before still match."""
    digest = hashlib.sha256()
    signed = _cloudevent_headers(headers)
    if signed:
        # a leading NUL (a method is never empty) and each name and value length-prefixed:
        # no request hashes the same bytes as one with other headers, or with none
        digest.update(b"\0")
        for name, value in signed:
            digest.update(b"%d:%s%d:%s" % (len(name), name, len(value), value))
        digest.update(b"\0")
    for part in (method.encode(), path.encode(), query):
        digest.update(part)
        digest.update(b"\0")
    digest.update(body)
    return digest.hexdigest()


def _cloudevent_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The `ce-*` headers, names lower-cased and sorted (repeats kept in the order sent),
    values as sent, with Content-Type; none when there is no `ce-*` header."""
    lowered = [(name.lower(), value) for name, value in headers]
    if not any(name.startswith(b"ce-") for name, _ in lowered):
        return []
    return sorted(((name, value) for name, value in lowered
                   if name.startswith(b"ce-") or name == b"content-type"),
                  key=lambda header: header[0])


def _too_large() -> ApiError:
    return ApiError("payload_too_large", f"The body is larger than {MAX_BODY_BYTES} bytes",
                    status=413)


#: What `_read_body` gives when the client disconnects before the end of its body.
_DISCONNECTED = object()


async def _read_body(receive) -> bytes | object | None:
    """The whole body; None when it exceeds MAX_BODY_BYTES; `_DISCONNECTED` when the client
    left before it ended: the part that came is not the request."""
    chunks = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return _DISCONNECTED
        chunks += message.get("body", b"")
        if len(chunks) > MAX_BODY_BYTES:
            return None
        if not message.get("more_body"):
            break
    return bytes(chunks)


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


async def _send(send, status: int, headers: list, body: bytes) -> None:
    hdrs = [h for h in headers if h[0].lower() != b"content-length"]
    hdrs.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})

