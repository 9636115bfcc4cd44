"""``/health`` during a drain: 503 from the first signal on, so a load balancer's health
check (deploy/haproxy.cfg) takes the replica out at once while its streams finish."""

from __future__ import annotations

import trio

from trioserve.api.app import create_app
from trioserve.config import ServerConfig
from trioserve.engine.scheduler import Engine, EngineConfig
from trioserve.testing.fake_worker import FakeWorker


async def test_health_answers_503_draining_as_soon_as_the_drain_begins(model_dir):
    engine = Engine(
        EngineConfig(load=lambda: (None, None), parallel=2, worker_factory=FakeWorker.factory())
    )
    app = create_app(ServerConfig(model=model_dir), engine=engine)
    state = app.extensions["trioserve"]
    with trio.fail_after(30):
        async with app.test_app() as test_app:
            client = test_app.test_client()
            health = await client.get("/health")  # the pool has started: the engine is up
            assert health.status_code == 200
            assert (await health.get_json())["status"] == "ok"

            state.drain.begin()  # what the first SIGINT/SIGTERM does (server._stop_on_signals)
            health = await client.get("/health")
            assert health.status_code == 503
            body = await health.get_json()
            assert body["status"] == "draining"
            assert body["slots_total"] == 2  # the figures stay, for monitors
            response = await client.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
            )
            assert response.status_code == 503
