"""A Ray actor that serves the teacher checkpoint with the prefill-only scoring server."""

from __future__ import annotations

import ray

from asyncopd.config.schema import TeacherConfig
from asyncopd.net.actor import ServiceHost, set_threads


class TeacherHost(ServiceHost):
    """Loads the HF checkpoint (fp32, eval), serves /score on cfg.host (port 0 = free); `start()` -> URL."""

    role = "teacher"
    cfg: TeacherConfig

    def _launch(self, port: int):
        from asyncopd.model.build import load_model
        from asyncopd.teacher.server import TeacherServer

        set_threads(self.cfg.threads)
        model = load_model(self.model_path, field="model.teacher_path")
        return TeacherServer(model, self.model_path, host=self.cfg.host, port=port,
                             api_key=self.cfg.api_key, max_tokens_per_forward=self.cfg.max_tokens_per_forward
                             ).start()


TeacherActor = ray.remote(TeacherHost)
