"""The OpenAPI schema that generated clients are built from."""

from __future__ import annotations

from collections import Counter

from fastapi.testclient import TestClient


def test_operation_ids_are_the_route_functions_names_and_unique(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    ids = [op["operationId"] for path in spec["paths"].values() for op in path.values()]

    assert [name for name, count in Counter(ids).items() if count > 1] == []
    assert {"create_job", "get_job", "job_events", "create_sweep", "create_webhook"} <= set(ids)
