"""SGLang's native HTTP API in front of a RolloutEngine (FastAPI, uvicorn on a thread)."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone

from fastapi import Query, Request, Response
from starlette.concurrency import run_in_threadpool

from asyncopd.config.schema import RolloutConfig
from asyncopd.net.server import ApiError, HttpService, check_bind, make_app, read_json
from asyncopd.rollout.engine import HEALTH_CHECK_TIMEOUT_S, LOAD_SECTIONS, RolloutEngine


def build_app(engine: RolloutEngine, api_key: str = "",
              max_request_bytes: int = RolloutConfig.max_request_bytes):
    app = make_app("asyncopd-rollout", api_key, max_request_bytes, "rollout.max_request_bytes")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/health_generate")
    async def health_generate():
        """SGLang's: 200 once a one-token generation went through, 503 if none did within its timeout."""
        try:
            await asyncio.wait_for(run_in_threadpool(engine.health_generate), HEALTH_CHECK_TIMEOUT_S)
        except Exception:  # a timeout, or the forward failed: either way not healthy
            return Response(status_code=503)
        return Response(status_code=200)

    @app.post("/abort_request")
    async def abort_request(request: Request):
        await run_in_threadpool(engine.abort_request, await read_json(request))
        return Response(status_code=200)

    @app.get("/v1/loads")
    async def loads(dp_rank: int | None = None, include: str | None = None,
                    fmt: str | None = Query(None, alias="format")):
        """SGLang's /v1/loads: one engine is one dp rank (0); no section beyond the core fields exists here."""
        sections = {s.strip() for s in include.split(",")} if include else set()
        if not sections <= LOAD_SECTIONS:
            raise ApiError(f"Invalid include sections: {sorted(sections - LOAD_SECTIONS)}. "
                           f"Valid options: {sorted(LOAD_SECTIONS)}")
        rows = [engine.load()] if dp_rank in (None, 0) else []
        if fmt == "prometheus":
            lines = []
            for key, value in (rows[0].items() if rows else ()):
                if key != "dp_rank" and isinstance(value, (int, float)):
                    lines += [f"# TYPE sglang_{key} gauge", f'sglang_{key}{{dp_rank="0"}} {value}']
            return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4; charset=utf-8")
        return {"timestamp": datetime.now(timezone.utc).isoformat(), "version": engine.server_info()["version"],
                "accelerator": None, "num_accelerators": 1, "loads": rows}

    @app.get("/get_load")
    async def get_load():
        """The legacy per-dp-rank list sglang-router's power_of_two policy reads (it sums num_tokens)."""
        load = engine.load()
        return [{"dp_rank": 0, "num_reqs": load["num_running_reqs"] + load["num_waiting_reqs"],
                 "num_waiting_reqs": load["num_waiting_reqs"], "num_tokens": load["num_used_tokens"]}]

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info():
        return engine.model_info()

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info(request: Request):
        host, port = request.scope.get("server") or ("", 0)
        return {**engine.server_info(), "host": host, "port": port}

    @app.get("/get_weight_version")
    async def get_weight_version():
        return {"weight_version": str(engine.weight_version)}

    @app.api_route("/generate", methods=["POST", "PUT"])
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

    async def optional_json(request: Request) -> dict:
        """SGLang's control endpoints take an optional JSON body (every field has a default)."""
        return await read_json(request) if await request.body() else {}

    @app.post("/begin_weight_update")
    async def begin_weight_update(request: Request):
        return await run_in_threadpool(engine.begin_weight_update, await optional_json(request))

    @app.post("/end_weight_update")
    async def end_weight_update(request: Request):
        return await run_in_threadpool(engine.end_weight_update, await optional_json(request))

    @app.post("/update_weight_version")
    async def update_weight_version(request: Request):
        return await run_in_threadpool(engine.update_weight_version, await read_json(request))

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache(timeout: float = Query(0.0, ge=0.0)):
        """SGLang's answer: plain text, 200 when flushed, 400 while requests hold KV."""
        ok, message = await run_in_threadpool(engine.flush_cache, timeout)
        return Response(message, status_code=200 if ok else 400, media_type="text/plain")

    @app.post("/pause_generation")
    async def pause(request: Request):
        return await run_in_threadpool(engine.pause, await optional_json(request))

    @app.post("/continue_generation")
    async def resume(request: Request):
        return await run_in_threadpool(engine.resume, await optional_json(request))

    return app


class RolloutServer(HttpService):
    """A RolloutEngine served on host:port (port 0 = free port); `.url` is the base URL."""

    def __init__(self, engine: RolloutEngine, *, host: str = "127.0.0.1", port: int = 0, api_key: str = "",
                 max_request_bytes: int = RolloutConfig.max_request_bytes):
        check_bind(host, api_key, "rollout")
        self.engine = engine
        self._listen(build_app(engine, api_key, max_request_bytes), host, port)

    def stop(self) -> None:
        super().stop()
        self.engine.close()
