import httpx

from tests.live_service import LiveService


def test_the_live_service_wants_its_key(live_service: LiveService) -> None:
    assert httpx.get(f"{live_service.url}/v1/jobs").status_code == 401
    headers = {"Authorization": f"Bearer {live_service.api_key}"}
    assert httpx.get(f"{live_service.url}/v1/jobs", headers=headers).status_code == 200
