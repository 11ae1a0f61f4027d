"""What the rollout and teacher Ray actors share: thread budget, reachable URL, model loading."""

from __future__ import annotations

import torch


def set_threads(threads: int) -> None:
    """The role's CPU budget (DESIGN.md: a fixed budget per role, the same in every mode)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def public_url(url: str, host: str) -> str:
    """A wildcard bind (0.0.0.0 / ::) is reached at this node's IP, not at the wildcard."""
    if host not in ("0.0.0.0", "::", ""):
        return url
    import ray

    ip = ray.util.get_node_ip_address()
    port = url.rsplit(":", 1)[1]
    return f"http://{ip}:{port}"


class ServiceHost:
    """Body of a Ray actor that loads a checkpoint and serves it: `start()` -> base URL, `stop()`.

    Subclasses implement `_launch()` (load the model within the role's thread budget, return a started
    HttpService); `self.cfg` is the role's config (host, port, api_key, ...).
    """

    role = "service"

    def __init__(self, model_path: str, cfg):
        self.model_path = model_path
        self.cfg = cfg
        self.server = None

    def _launch(self):
        raise NotImplementedError

    def start(self) -> str:
        if self.server is None:
            self.server = self._launch()
        return self.url()

    def url(self) -> str:
        if self.server is None:
            raise RuntimeError(f"{self.role} not started: call start() first")
        return public_url(self.server.url, self.cfg.host)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
