"""A real HTTP webhook receiver for tests.

    async with WebhookReceiver(fail_first=2) as receiver:
        ... create an endpoint with url=receiver.url, make things happen ...
        await receiver.wait_for(lambda reqs: len(delivered(reqs)) == 3, timeout=30)
        events = receiver.verify(secret)  # every request checked by `standardwebhooks`

It listens on 127.0.0.1 on a free port (uvicorn serving a bare Starlette app), records every
request (method, path, headers, raw body, the status it answered), and answers 200, or 500 for
the first `fail_first` requests (more with `fail_next(n)`). Signatures are checked with the
`standardwebhooks` package, an implementation of the specification independent of ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    status: int  # what the receiver answered
    received_at: float = field(default_factory=time.time)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def webhook_id(self) -> str | None:
        return self.headers.get("webhook-id")

    def json(self) -> Any:
        return orjson.loads(self.body)

    def verify(self, secret: str) -> Any:
        """The parsed event if the signature verifies with `secret`; raises
        `standardwebhooks.WebhookVerificationError` otherwise."""
        return Webhook(secret).verify(self.body, self.headers)


def delivered(requests: Sequence[ReceivedRequest]) -> list[ReceivedRequest]:
    """The requests the receiver accepted (answered 2xx)."""
    return [r for r in requests if r.ok]


class WebhookReceiver:
    def __init__(self, *, fail_first: int = 0, fail_status: int = 500,
                 delay_s: float = 0.0) -> None:
        self.fail_status = fail_status
        self.delay_s = delay_s  # answer this late (to test timeouts)
        self._fail_remaining = fail_first
        self._requests: list[ReceivedRequest] = []
        self._changed = asyncio.Condition()
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None
        self._socket: socket.socket | None = None
        self.port: int | None = None

    # -- control -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The URL to register as an endpoint (any path is accepted)."""
        return self.url_for("/hook")

    def url_for(self, path: str) -> str:
        if self.port is None:
            raise RuntimeError("the receiver is not started")
        return f"http://127.0.0.1:{self.port}{path}"

    def fail_next(self, n: int, status: int | None = None) -> None:
        """Answer the next `n` requests with `status` (default: fail_status, 500)."""
        self._fail_remaining = n
        if status is not None:
            self.fail_status = status

    @property
    def requests(self) -> list[ReceivedRequest]:
        return list(self._requests)

    def clear(self) -> None:
        self._requests.clear()

    # -- assertions --------------------------------------------------------------------------
    def verify(self, secret: str, requests: Sequence[ReceivedRequest] | None = None) -> list[Any]:
        """Verify every recorded request (or `requests`) with `secret` using `standardwebhooks`;
        returns the parsed bodies, raises on the first that does not verify."""
        return [r.verify(secret) for r in (self._requests if requests is None else requests)]

    async def wait_for(
        self, predicate: Callable[[list[ReceivedRequest]], Any], timeout: float = 30.0
    ) -> list[ReceivedRequest]:
        """Wait until `predicate(requests)` is truthy; returns the requests then. Raises
        AssertionError with what was received on timeout."""
        async def satisfied() -> list[ReceivedRequest]:
            async with self._changed:
                await self._changed.wait_for(lambda: bool(predicate(list(self._requests))))
                return list(self._requests)

        try:
            return await asyncio.wait_for(satisfied(), timeout)
        except TimeoutError:
            summary = [(r.status, r.webhook_id, r.body[:120]) for r in self._requests]
            raise AssertionError(
                f"webhook receiver: condition not met within {timeout}s; "
                f"{len(self._requests)} requests: {summary}"
            ) from None

    # -- server ------------------------------------------------------------------------------
    async def _handle(self, request: Request) -> Response:
        body = await request.body()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self._fail_remaining > 0:
            self._fail_remaining -= 1
            status = self.fail_status
        else:
            status = 200
        headers = {k.lower(): v for k, v in request.headers.items()}
        received = ReceivedRequest(request.method, request.url.path, headers, body, status)
        async with self._changed:
            self._requests.append(received)
            self._changed.notify_all()
        return Response(b'{"received": true}' if status < 300 else b'{"error": "test failure"}',
                        status_code=status, media_type="application/json")

    async def start(self) -> WebhookReceiver:
        app = Starlette(routes=[Route("/{path:path}", self._handle,
                                      methods=["POST", "PUT", "GET"])])
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._socket = sock
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]),
                                         name=f"webhook-receiver-{self.port}")
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 5)
        if self._socket is not None:
            self._socket.close()

    async def __aenter__(self) -> WebhookReceiver:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()
