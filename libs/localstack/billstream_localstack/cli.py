"""`billstream`: run the platform locally (`billstream dev`, what `make run` calls) and talk to
its admin API (`billstream admin ...`)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import httpx
from billstream_runtime.routes import GATEWAY_PORT, SERVICES

from billstream_localstack._proc import StartupError
from billstream_localstack.demo_tenant import (
    DEV_FILE,
    BootstrapError,
    bootstrap_demo_tenant,
    read_dev_file,
)
from billstream_localstack.stack import LocalStack

DEFAULT_ROOT = Path(".billstream")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return int(args.run(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="billstream", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    dev = commands.add_parser("dev", help="run the whole platform locally with a demo tenant")
    dev.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="state directory")
    dev.add_argument("--port", type=int, default=GATEWAY_PORT, help="gateway port (0: any)")
    dev.add_argument(
        "--any-ports",
        action="store_true",
        help="free ports for the gateway and every service (to run several stacks side by side)",
    )
    dev.add_argument(
        "--database-url",
        default=os.environ.get("BILLSTREAM_DATABASE_URL"),
        help="an external PostgreSQL server instead of the embedded one",
    )
    dev.add_argument(
        "--kafka-bootstrap",
        default=os.environ.get("BILLSTREAM_KAFKA_BOOTSTRAP"),
        help="an external Kafka instead of the embedded broker",
    )
    dev.add_argument("--log-level", default=os.environ.get("BILLSTREAM_LOG_LEVEL", "INFO"))
    dev.set_defaults(run=_run_dev)

    admin = commands.add_parser("admin", help="call the admin API").add_subparsers(
        required=True, metavar="ACTION"
    )
    create = admin.add_parser("create-tenant", help="create a tenant and print its keys")
    create.add_argument("--name", required=True)
    create.set_defaults(run=_run_create_tenant)
    get = admin.add_parser("get-tenant", help="print a tenant")
    get.add_argument("tenant_id")
    get.set_defaults(run=_run_get_tenant)
    for command in (create, get):
        command.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where dev.json is")
        command.add_argument("--base-url", help="default: from dev.json")
        command.add_argument("--admin-token", help="default: $BILLSTREAM_ADMIN_TOKEN or dev.json")
    return parser


# -- billstream dev -------------------------------------------------------------------------------


def _run_dev(args: argparse.Namespace) -> int:
    root: Path = args.root
    stack = LocalStack(
        root,
        gateway_port=0 if args.any_ports else args.port,
        service_ports=dict.fromkeys(SERVICES, 0) if args.any_ports else None,
        external_database_url=args.database_url,
        external_kafka=args.kafka_bootstrap,
        log_level=args.log_level,
    )
    # Stop as cleanly on SIGTERM as on Ctrl-C. SIGINT is installed explicitly too: a process
    # started in the background by a non-interactive shell inherits SIGINT as ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        print("Starting Billstream...", flush=True)
        stack.start()
        dev = bootstrap_demo_tenant(
            stack.base_url,
            stack.admin_token,
            stack.service_urls,
            root,
            extra={
                "kafka_bootstrap": stack.kafka_bootstrap,
                "database_url": stack.public_database_url,
            },
        )
        print(_banner(dev, stack.logs_dir, root / DEV_FILE), flush=True)
        _watch(stack)
    except KeyboardInterrupt:
        print("\nStopping Billstream...", flush=True)
    except (StartupError, BootstrapError) as exc:
        print(f"billstream dev: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
    return 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _watch(stack: LocalStack) -> None:
    """Block until interrupted, reporting any process that exits on its own."""
    reported: set[str] = set()
    while True:
        time.sleep(1.0)
        for name, code in stack.exited().items():
            if name not in reported:
                reported.add(name)
                log = stack.logs_dir / f"{name}.log"
                print(f"warning: {name} exited with code {code}; see {log}", file=sys.stderr)


def _banner(dev: dict[str, str], logs_dir: Path, dev_file: Path) -> str:
    base = dev["base_url"]
    rows = [
        ("API base URL", base),
        ("API docs", f"{base}/docs"),
        ("Tenant", dev["tenant_id"]),
        ("Test secret key", dev["test_secret_key"]),
        ("Test publishable key", dev["test_publishable_key"]),
        ("Live secret key", dev["live_secret_key"]),
        ("Live publishable key", dev["live_publishable_key"]),
        ("Admin token", dev["admin_token"]),
        ("Kafka bootstrap", dev["kafka_bootstrap"]),
        ("PostgreSQL", dev["database_url"]),
        ("Logs", f"{logs_dir}/"),
        ("All of the above in", str(dev_file)),
    ]
    width = max(len(label) for label, _ in rows)
    lines = [f"  {label.ljust(width)}  {value}" for label, value in rows]
    example = f'curl -H "Authorization: Bearer {dev["test_secret_key"]}" {base}/v1/customers'
    return "\n".join(
        ["", "Billstream is running.", "", *lines, "", f"Try:  {example}", "Press Ctrl-C to stop."]
    )


# -- billstream admin -----------------------------------------------------------------------------


def _run_create_tenant(args: argparse.Namespace) -> int:
    return _call_admin(args, "POST", "/admin/v1/tenants", {"name": args.name})


def _run_get_tenant(args: argparse.Namespace) -> int:
    return _call_admin(args, "GET", f"/admin/v1/tenants/{args.tenant_id}")


def _call_admin(
    args: argparse.Namespace, method: str, path: str, body: dict[str, str] | None = None
) -> int:
    """Send one admin request and print the JSON answer; exit code 1 unless it succeeded."""
    headers = {"Idempotency-Key": uuid.uuid4().hex} if method == "POST" else {}
    with _admin_client(args) as admin:
        try:
            response = admin.request(method, path, json=body, headers=headers)
        except httpx.HTTPError as exc:
            print(f"billstream admin: {admin.base_url} unreachable: {exc}", file=sys.stderr)
            return 1
    try:
        print(json.dumps(response.json(), indent=2))
    except ValueError:
        print(response.text)
    return 0 if response.is_success else 1


def _admin_client(args: argparse.Namespace) -> httpx.Client:
    dev = read_dev_file(args.root / DEV_FILE)
    base_url = args.base_url or dev.get("base_url") or f"http://127.0.0.1:{GATEWAY_PORT}"
    token = (
        args.admin_token
        or os.environ.get("BILLSTREAM_ADMIN_TOKEN")
        or dev.get("admin_token")
        or _read_token_file(args.root / "admin_token")
    )
    if not token:
        raise SystemExit(
            "billstream admin: no admin token: pass --admin-token or run billstream dev"
        )
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.Client(base_url=base_url, headers=headers, timeout=30.0, trust_env=False)


def _read_token_file(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
