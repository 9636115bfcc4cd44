"""Before the engine has loaded the model, the app says so instead of failing."""

from __future__ import annotations

from trioserve.api.app import create_app
from trioserve.config import ServerConfig


async def test_health_is_503_and_requests_get_503_while_the_model_loads(model_dir):
    # The app without its lifespan: the engine never starts, as in the first seconds.
    app = create_app(ServerConfig(model=model_dir))
    client = app.test_client()
    health = await client.get("/health")
    assert health.status_code == 503
    assert (await health.get_json())["status"] == "loading"
    response = await client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
    )
    assert response.status_code == 503
    error = (await response.get_json())["error"]
    assert error["type"] == "server_error" and "loading" in error["message"]
    assert response.headers["Retry-After"]
