"""`python -m billstream_ingestion [serve|migrate|rebuild NAME]`."""

from billstream_ingestion.bootstrap import build
from billstream_messaging import run_cli


def main() -> None:
    run_cli(build)


if __name__ == "__main__":
    main()
