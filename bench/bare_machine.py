"""Stand-ins for packages that a lent device machine lacks and a bench run there never uses.

Import it before anything from ``core``: ``core.storage`` (imported by ``core.inputs`` and so by
nearly all of ``core``) imports boto3 and botocore for its S3 backend, which an in-process job
never touches, and the lent machines' system Python predates that import. Where both are
installed this does nothing; ``STUBBED`` names what it stood in for.
"""

from __future__ import annotations

import sys
import types


def stub_boto3() -> list[str]:
    """Empty boto3 and botocore modules with the names ``core.storage`` imports, if either
    is missing; returns the names stood in for."""
    try:
        import boto3  # noqa: F401
        import botocore  # noqa: F401

        return []
    except ImportError:
        pass
    names = ["boto3", "boto3.s3", "boto3.s3.transfer", "botocore", "botocore.config"]
    modules = {name: types.ModuleType(name) for name in [*names, "botocore.exceptions"]}
    modules["boto3.s3.transfer"].TransferConfig = object  # type: ignore[attr-defined]
    modules["botocore.config"].Config = object  # type: ignore[attr-defined]
    errors = modules["botocore.exceptions"]
    errors.BotoCoreError = type("BotoCoreError", (Exception,), {})  # type: ignore[attr-defined]
    errors.ClientError = type("ClientError", (Exception,), {})  # type: ignore[attr-defined]
    sys.modules.update(modules)
    return ["boto3", "botocore"]


STUBBED = stub_boto3()
