"""A Ray actor that serves the student checkpoint with the embedded engine (SGLang's HTTP API)."""

from __future__ import annotations

import ray

from asyncopd.config.schema import RolloutConfig
from asyncopd.net.actor import ServiceHost, set_threads


class RolloutEngineHost(ServiceHost):
    """Loads the HF checkpoint (fp32, eval), serves it on cfg.host (port 0 = free); `start()` -> URL."""

    role = "rollout engine"
    probe_paths = ("/health_generate", "/health")  # a one-token generation: a wedged engine shows
    cfg: RolloutConfig

    def _launch(self, port: int):
        from asyncopd.model.build import load_model
        from asyncopd.rollout.engine import RolloutEngine
        from asyncopd.rollout.http_server import RolloutServer

        set_threads(self.cfg.threads_per_engine)
        model = load_model(self.model_path, field="model.student_path")
        engine = RolloutEngine(model, self.model_path, group_timeout_s=self.cfg.group_timeout_s,
                               max_batch_size=self.cfg.max_batch_size)
        return RolloutServer(engine, host=self.cfg.host, port=port, api_key=self.cfg.api_key,
                             max_request_bytes=self.cfg.max_request_bytes).start()


RolloutEngineActor = ray.remote(RolloutEngineHost)
