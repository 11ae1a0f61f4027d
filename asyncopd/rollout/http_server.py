"""SGLang's native HTTP API in front of a RolloutEngine (FastAPI, uvicorn on a thread)."""

from __future__ import annotations

import json

from fastapi import Request, Response
from starlette.concurrency import run_in_threadpool

from asyncopd.net.server import HttpService, check_bind, make_app, read_json
from asyncopd.rollout.engine import RolloutEngine


def build_app(engine: RolloutEngine, api_key: str = ""):
    app = make_app("asyncopd-rollout", api_key)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info():
        return engine.model_info()

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info():
        return engine.server_info()

    @app.get("/get_weight_version")
    async def get_weight_version():
        return {"weight_version": str(engine.weight_version)}

    @app.post("/generate")
    async def generate(request: Request):
        payload = await read_json(request)
        # Serialise in the worker thread with plain json: FastAPI's generic encoder walks every nested
        # list element in Python and dominates the cost of large logprob / MC answers.
        body = await run_in_threadpool(lambda: json.dumps(engine.generate(payload), separators=(",", ":")))
        return Response(body, media_type="application/json")

    @app.post("/init_weights_update_group")
    async def init_group(request: Request):
        payload = await read_json(request)
        return await run_in_threadpool(engine.init_weights_update_group, payload)

    @app.post("/update_weights_from_distributed")
    async def update_weights(request: Request):
        payload = await read_json(request)
        return await run_in_threadpool(engine.update_weights_from_distributed, payload)

    @app.post("/destroy_weights_update_group")
    async def destroy_group(request: Request):
        payload = await read_json(request)
        return await run_in_threadpool(engine.destroy_weights_update_group, payload)

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        return engine.flush_cache()

    @app.post("/pause_generation")
    async def pause(request: Request):
        payload = await read_json(request) if await request.body() else {}
        return await run_in_threadpool(engine.pause, payload)

    @app.post("/continue_generation")
    async def resume():
        return await run_in_threadpool(engine.resume)

    return app


class RolloutServer(HttpService):
    """A RolloutEngine served on host:port (port 0 = free port); `.url` is the base URL."""

    def __init__(self, engine: RolloutEngine, *, host: str = "127.0.0.1", port: int = 0, api_key: str = ""):
        check_bind(host, api_key, "rollout")
        self.engine = engine
        self._listen(build_app(engine, api_key), host, port)

    def stop(self) -> None:
        super().stop()
        self.engine.close()
