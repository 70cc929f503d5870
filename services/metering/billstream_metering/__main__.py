"""`python -m billstream_metering [serve|migrate|rebuild NAME]`."""

from billstream_messaging import run_cli
from billstream_metering.bootstrap import build


def main() -> None:
    run_cli(build)


if __name__ == "__main__":
    main()
