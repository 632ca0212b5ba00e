"""The client package runs where the service does not: Python 3.8 (JetPack 5's) and no torch,
nothing of the service's own code (core, api, worker) or its server libraries."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.utils import REPO_ROOT

PACKAGE = REPO_ROOT / "client" / "sqakd_client"
SERVER_SIDE = ("torch", "core", "api", "worker", "fastapi", "celery", "sqlalchemy")


def test_the_client_needs_at_most_python_3_8() -> None:
    # --eval-annotations: read annotations as if evaluated, so `list[str]` or `X | None` in
    # one counts as 3.9 / 3.10 even under `from __future__ import annotations`.
    # vermin has no __main__ (no `python -m vermin`): its console script's entry point.
    result = subprocess.run(
        [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())"]
        + ["-t=3.8-", "--no-tips", "--eval-annotations", "-v", str(PACKAGE)],
        capture_output=True,
        text=True,
        check=False,
    )
    report = result.stdout + result.stderr
    found = re.search(r"Minimum required versions: (?:~2, )?(\d+)\.(\d+)", report)
    assert found, report
    assert (int(found[1]), int(found[2])) <= (3, 8), report
    assert result.returncode == 0, report


def test_importing_the_client_imports_nothing_of_the_server() -> None:
    modules = ["sqakd_client"] + (["sqakd_client.cli"] if (PACKAGE / "cli.py").exists() else [])
    probe = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {SERVER_SIDE!r})))"
    )
    # From the repository root, where core, api and worker are importable, were they asked for.
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout) == []
