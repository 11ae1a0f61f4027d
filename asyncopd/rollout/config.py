from dataclasses import dataclass


@dataclass
class RolloutConfig:
    """The rollout fleet: embedded engines or SGLang servers, all spoken to through SGLang's HTTP API."""

    backend: str = "embedded"  # embedded | sglang
    num_engines: int = 1
    threads_per_engine: int = 1
    gpus_per_engine: float = 0.0  # Ray GPUs per engine actor (an SGLang server's TP size on a cluster)
    host: str = "127.0.0.1"
    port: int = 0  # 0 = a free port (each engine gets its own)
    api_key: str = ""
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    request_timeout_s: float = 300.0
    group_timeout_s: float = 120.0  # how long an engine waits for the learner to join the weight group
    startup_timeout_s: float = 600.0  # how long the launcher waits for an SGLang server's /health
    sglang_args: str = ""  # extra flags for `python -m sglang.launch_server` (production only)
