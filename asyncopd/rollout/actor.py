"""A Ray actor that serves the student checkpoint with the embedded engine (SGLang's HTTP API)."""

from __future__ import annotations

import ray

from asyncopd.net.actor import public_url, set_threads
from asyncopd.rollout.config import RolloutConfig


class RolloutEngineHost:
    """Loads the HF checkpoint (fp32, eval), serves it on cfg.host (port 0 = free); `start()` -> URL."""

    def __init__(self, model_path: str, cfg: RolloutConfig):
        self.model_path = model_path
        self.cfg = cfg
        self.server = None

    def start(self) -> str:
        if self.server is None:
            from asyncopd.model.build import load_model
            from asyncopd.rollout.engine import RolloutEngine
            from asyncopd.rollout.http_server import RolloutServer

            set_threads(self.cfg.threads_per_engine)
            model = load_model(self.model_path, field="model.student_path")
            engine = RolloutEngine(model, self.model_path, group_timeout_s=self.cfg.group_timeout_s)
            self.server = RolloutServer(engine, host=self.cfg.host, port=self.cfg.port,
                                        api_key=self.cfg.api_key).start()
        return self.url()

    def url(self) -> str:
        if self.server is None:
            raise RuntimeError("engine not started: call start() first")
        return public_url(self.server.url, self.cfg.host)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


RolloutEngineActor = ray.remote(RolloutEngineHost)
