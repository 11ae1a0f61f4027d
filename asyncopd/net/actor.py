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
