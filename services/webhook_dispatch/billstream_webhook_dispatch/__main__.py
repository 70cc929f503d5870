"""`python -m billstream_webhook_dispatch [serve|migrate|rebuild NAME]`."""

from billstream_messaging import run_cli
from billstream_webhook_dispatch.bootstrap import build


def main() -> None:
    run_cli(build)


if __name__ == "__main__":
    main()
