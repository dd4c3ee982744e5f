"""shepherd's command line: parse flags and environment -> Config -> logging -> trio.run(supervisor)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import trio

from supervisor.config import ConfigError, load_config
from supervisor.logs import configure_logging
from supervisor.redact import Redactor
from supervisor.run import EXIT_CONFIG, run


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        config = load_config(argv, os.environ)
    except ConfigError as exc:
        print(f"shepherd: configuration error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    redactor = Redactor.from_environ(os.environ)
    if config.master_token:
        redactor.add(config.master_token)  # also when given as a flag rather than a variable
    configure_logging(config.log_format, config.log_level, redactor)
    return trio.run(run, config)


if __name__ == "__main__":
    sys.exit(main())
