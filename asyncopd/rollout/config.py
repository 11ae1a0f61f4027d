from dataclasses import dataclass


@dataclass
class RolloutConfig:
    """The rollout fleet: embedded engines or SGLang servers, all spoken to through SGLang's HTTP API."""

    backend: str = "embedded"  # embedded | sglang
    num_engines: int = 1
    threads_per_engine: int = 1
    host: str = "127.0.0.1"
    api_key: str = ""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    request_timeout_s: float = 300.0
    sglang_args: str = ""  # extra flags for `python -m sglang.launch_server` (production only)
