"""`python -m billstream_subscription [serve|migrate|rebuild NAME]`."""

from __future__ import annotations

from billstream_messaging import run_cli
from billstream_subscription.bootstrap import build


def main() -> None:
    run_cli(build)


if __name__ == "__main__":
    main()
