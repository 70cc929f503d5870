"""The HTTP load generator of the ingestion benchmark, run as its own OS process
(`python -m bench.ingest_load CONFIG_JSON`) so that it does not share a GIL with the service
nor with the bench process that measures.

It builds every request body first (orjson bytes), sends a short warm-up, prints one JSON line
`{"ready": ...}` and then runs one command per line read from stdin, answering each with one
JSON line:

- `{"run": "closed", "expect": "accepted"|"duplicate", "batches": B, "max_s": S}`:
  `connections` connections each send the next body as soon as their previous answer
  arrived, until bodies 0..B-1 were sent or S seconds passed. Every answer must be 200 with
  every event `accepted` (or every event `duplicate`).
- `{"run": "open"}`: batch `i` is sent at `start + i / rate` whatever the answers (open loop,
  no coordinated omission: the send time is the scheduled one, and there are more connections
  than requests in flight). Answers the scheduled send time of every batch.

A 503/429 (the service's backpressure) is retried after its Retry-After, a transport error
at once (then `duplicate` is an accepted outcome for that body: the lost attempt may have been
taken; the bench checks the usage_keys count, so nothing can be counted twice unnoticed); both
are counted.
Times are `time.monotonic()` (CLOCK_MONOTONIC, shared by every process of the machine), so the
bench process can compare them with its own clock.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import orjson
import uvloop

WARMUP_BATCHES = 8
MAX_RETRIES = 120


def event_key(prefix: str, i: int) -> str:
    return f"{prefix}-{i}"


#: BENCH_EVENT_PROPERTIES=N gives every event the first N of these properties (at most 5;
#: default none), as a producer's events usually carry: {"region": "eu-west-1", "model": "m-7",
#: "tokens": 1234, "cached": false, "latency_s": 0.125} (the fifth, a non-integer number, is
#: parsed as an exact decimal). The default stays none, so that figures compare with earlier
#: runs.
EVENT_PROPERTIES = max(0, min(5, int(os.environ.get("BENCH_EVENT_PROPERTIES", "0"))))
_REGIONS = ("eu-west-1", "us-east-1", "ap-south-1")


def with_properties(event: dict, i: int) -> dict:
    if EVENT_PROPERTIES:
        event["properties"] = dict(list({
            "region": _REGIONS[i % 3], "model": f"m-{i % 11}", "tokens": 1000 + i % 5000,
            "cached": i % 7 == 0, "latency_s": (i % 997) / 8}.items())[:EVENT_PROPERTIES])
    return event


def build_bodies(prefix: str, n_events: int, batch: int, customers: int,
                 seed: int) -> list[bytes]:
    """`{"events": [...]}` bodies of `batch` native events each, unique idempotency keys,
    customers drawn from `customers` external ids, quantity "1", timestamp now."""
    rng = random.Random(seed)
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    names = [f"bench-cust-{c:04d}" for c in range(customers)]
    bodies = []
    for start in range(0, n_events, batch):
        events = [
            with_properties({"idempotency_key": event_key(prefix, i),
                             "customer": names[rng.randrange(customers)],
                             "meter": "api_calls", "quantity": "1", "timestamp": now}, i)
            for i in range(start, min(start + batch, n_events))
        ]
        bodies.append(orjson.dumps({"events": events}))
    return bodies


def check_answer(response: Answer, expect: str, n: int,
                 resent: bool = False) -> str | None:
    """None when the answer is 200 and every one of the `n` events has status `expect` (or
    `duplicate`, when the body was resent after a lost attempt that may have been taken)."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    body = orjson.loads(response.content)
    results = body.get("results", [])
    allowed = {expect, "duplicate"} if resent else {expect}
    counts = {"accepted": body.get("accepted"), "duplicate": body.get("duplicates"),
              "rejected": body.get("rejected")}
    if sum(counts[s] or 0 for s in allowed) != n or len(results) != n:
        bad = next((r for r in results if r.get("status") not in allowed), None)
        return f"expected {n} {'/'.join(sorted(allowed))}, got {counts} (first other: {bad})"
    if any(r["status"] not in allowed for r in results):
        return f"the counts say {n} {'/'.join(sorted(allowed))} but a result does not"
    return None


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    # nearest rank
    index = min(len(sorted_values) - 1, max(0, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


@dataclass(slots=True)
class Answer:
    status_code: int
    headers: dict[str, str]
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


class TransportError(Exception):
    """The connection failed or closed under a request."""


class RawClient:
    """A minimal HTTP/1.1 keep-alive client for one kind of request (POST with a JSON body):
    httpx spent more CPU than the service's own HTTP layer, on a machine the service shares
    with its load (see bench/README.md). One connection per concurrent request, reopened
    after a failure; answers read by Content-Length (or chunked)."""

    def __init__(self, url: str, headers: dict[str, str], connections: int) -> None:
        parsed = urlsplit(url)
        self.host, self.port = parsed.hostname, parsed.port or 80
        self.head = "".join(f"{k}: {v}\r\n" for k, v in {
            "Host": f"{self.host}:{self.port}", **headers}.items()).encode()
        # (reader, writer, last used): a connection idle for 2 s is closed rather than reused,
        # before the server's keep-alive timeout (5 s) could close it under a request
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
        self.connections = connections

    async def post(self, path: str, content: bytes) -> Answer:
        conn = None
        while self.idle and conn is None:
            reader, writer, used = self.idle.pop()
            if time.monotonic() - used < 2.0:
                conn = (reader, writer)
            else:
                writer.close()
        try:
            if conn is None:
                conn = await asyncio.open_connection(self.host, self.port)
            reader, writer = conn
            writer.write(b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n"
                         % (path.encode(), self.head, len(content)))
            writer.write(content)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            if headers.get("transfer-encoding", "").lower() == "chunked":
                body = bytearray()
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    if size == 0:
                        await reader.readuntil(b"\r\n")
                        break
                    body += await reader.readexactly(size + 2)
                    del body[-2:]
                content_out = bytes(body)
            else:
                content_out = await reader.readexactly(int(headers.get("content-length", "0")))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError, IndexError) as exc:
            if conn is not None:
                conn[1].close()
            raise TransportError(repr(exc)) from exc
        if headers.get("connection", "").lower() == "close":
            writer.close()
        else:
            self.idle.append((reader, writer, time.monotonic()))
        return Answer(status, headers, content_out)

    async def aclose(self) -> None:
        for _, writer, _ in self.idle:
            writer.close()
        self.idle.clear()


class Generator:
    def __init__(self, config: dict) -> None:
        self.config = config
        self.batch = config["batch"]
        self.bodies: list[bytes] = []
        self.reset_counters()
        self.client = RawClient(config["url"], {
            "Authorization": f"Bearer {config['key']}", "Content-Type": "application/json"},
            config["connections"])

    def events_in(self, index: int) -> int:
        return min(self.batch, self.config["events"] - index * self.batch)

    async def prepare(self) -> dict:
        started = time.monotonic()
        c = self.config
        self.bodies = build_bodies(c["prefix"], c["events"], self.batch, c["customers"], c["seed"])
        prep_s = time.monotonic() - started
        # Warm-up: open the connections and the service's pools; these keys are not measured.
        warm = build_bodies(c["prefix"] + "-warmup", WARMUP_BATCHES * self.batch, self.batch,
                            c["customers"], c["seed"] + 1)
        answers = await asyncio.gather(*(self.client.post("/v1/usage/events", content=b)
                                         for b in warm))
        for response in answers:
            error = check_answer(response, "accepted", self.batch)
            if error:
                return {"ready": False, "error": f"warm-up: {error}"}
        return {"ready": True, "batches": len(self.bodies),
                "body_bytes": sum(map(len, self.bodies)), "prepare_s": round(prep_s, 2),
                "warmup_events": WARMUP_BATCHES * self.batch}

    async def post(self, index: int) -> tuple[Answer | None, bool, str | None]:
        """POST body `index` -> (answer, resent after a transport error, error).

        A 503/429 (backpressure) is retried after its Retry-After, as a well-behaved client
        does; a transport error (a connection closed under us) is retried at once, and then
        events the lost attempt had accepted come back `duplicate`. Both are counted."""
        resent = False
        for _ in range(MAX_RETRIES):
            try:
                response = await self.client.post("/v1/usage/events",
                                                  content=self.bodies[index])
            except TransportError as exc:
                self.transport_retries += 1
                self.last_transport_error = repr(exc)
                resent = True
                continue
            if response.status_code not in (429, 503):
                return response, resent, None
            self.busy_answers += 1
            try:
                delay = float(response.headers.get("retry-after", "1"))
            except ValueError:
                delay = 1.0
            await asyncio.sleep(delay)
        return None, resent, (f"no answer after {MAX_RETRIES} attempts (last transport "
                              f"error: {self.last_transport_error})")

    def reset_counters(self) -> dict:
        self.busy_answers = 0
        self.transport_retries = 0
        self.last_transport_error = None
        return {}

    def counters(self) -> dict:
        return {"busy_answers": self.busy_answers, "transport_retries": self.transport_retries,
                "last_transport_error": self.last_transport_error}

    async def closed(self, expect: str, batches: int, max_s: float | None) -> dict:
        """Send bodies 0.. until `batches` were sent or `max_s` seconds passed."""
        next_index = 0
        latencies: list[float] = []
        errors: list[str] = []
        self.reset_counters()
        started = time.monotonic()
        stop_at = started + max_s if max_s else float("inf")

        async def worker() -> None:
            nonlocal next_index
            while next_index < batches and len(errors) < 10 and time.monotonic() < stop_at:
                index = next_index
                next_index += 1
                sent = time.monotonic()
                response, resent, error = await self.post(index)
                if response is not None:
                    latencies.append(time.monotonic() - sent)
                    error = check_answer(response, expect, self.events_in(index), resent)
                if error:
                    errors.append(f"batch {index}: {error}")

        await asyncio.gather(*(worker() for _ in range(self.config["connections"])))
        ended = time.monotonic()
        latencies.sort()
        return {"started": started, "ended": ended, "requests": len(latencies),
                "batches": next_index,
                "events": sum(self.events_in(i) for i in range(next_index)),
                "errors": errors, **self.counters(),
                "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
                "max_s": latencies[-1] if latencies else None}

    async def open(self) -> dict:
        interval = self.batch / self.config["rate"]
        sends: list[float] = [0.0] * len(self.bodies)
        acks: list[float] = [0.0] * len(self.bodies)
        errors: list[str] = []
        self.reset_counters()

        async def send(index: int) -> None:
            response, resent, error = await self.post(index)
            if response is not None:
                acks[index] = time.monotonic()
                error = check_answer(response, "accepted", self.events_in(index), resent)
            if error:
                errors.append(f"batch {index}: {error}")

        tasks = []
        max_late = 0.0
        started = time.monotonic() + 0.05
        for index in range(len(self.bodies)):
            due = started + index * interval
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            # The scheduled time counts as the send time, so a late loop is not hidden.
            sends[index] = due
            max_late = max(max_late, time.monotonic() - due)
            tasks.append(asyncio.create_task(send(index)))
        last_sent = time.monotonic()
        await asyncio.gather(*tasks)
        ack_latencies = sorted(a - s for a, s in zip(acks, sends, strict=True) if a)
        return {"started": started, "last_sent": last_sent, "ended": time.monotonic(),
                "interval_s": interval, "sends": sends, "errors": errors,
                "ack_p50_s": percentile(ack_latencies, 50),
                "ack_p99_s": percentile(ack_latencies, 99), "max_late_s": max_late,
                **self.counters()}


async def main() -> None:
    config = orjson.loads(sys.argv[1])
    generator = Generator(config)
    out = sys.stdout.buffer

    def answer(obj: dict) -> None:
        out.write(orjson.dumps(obj) + b"\n")
        out.flush()

    answer(await generator.prepare())
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.buffer.readline)
        if not line.strip():
            break
        command = orjson.loads(line)
        if command["run"] == "closed":
            answer(await generator.closed(command["expect"],
                                          command.get("batches", len(generator.bodies)),
                                          command.get("max_s")))
        elif command["run"] == "open":
            answer(await generator.open())
        else:
            answer({"error": f"unknown command {command}"})
    await generator.client.aclose()


if __name__ == "__main__":
    uvloop.run(main())
