"""Start the API alone, as the Docker image does: ``python -m api.serve [--migrate]``.

Checks the settings before uvicorn binds: keys shorter than 32 characters, and a keyless start
(no ``API_KEYS``, or ``API_KEYS='{}'``) on anything but a loopback address, are refused with
exit code 2. ``make serve`` (scripts/serve.py) makes the same check for the whole local stack.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import uvicorn

from core.db import migrate
from core.settings import get_settings

log = logging.getLogger("api.serve")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--migrate", action="store_true", help="alembic upgrade head first (DATABASE_URL)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        # The same cached settings the app reads (api.main), from the same environment.
        settings = get_settings()
        settings.check_exposure()
    except ValueError as exc:  # pydantic's ValidationError too; it hides the inputs (keys)
        log.error("refusing to start: %s", exc)
        return 2
    if args.migrate:
        migrate(settings)
        log.info("database migrated")
    uvicorn.run(
        "api.main:app",
        host=settings.host,
        port=settings.port,
        workers=settings.api_processes,
        timeout_graceful_shutdown=5,
        log_level="info",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
