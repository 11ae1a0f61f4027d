from dataclasses import dataclass


@dataclass
class TeacherConfig:
    """The teacher scoring service: prefill-only, top-k and per-position query scores."""

    backend: str = "embedded"  # embedded | sglang
    replicas: int = 1
    tp: int = 1
    threads: int = 1
    gpus_per_replica: float = 0.0  # Ray GPUs per teacher replica (its TP size on a cluster)
    host: str = "127.0.0.1"
    port: int = 0  # 0 = a free port (each replica gets its own)
    api_key: str = ""
    wire_dtype: str = "float32"  # float32 | float16: dtype of logprobs on the wire
    request_timeout_s: float = 300.0
    max_tokens_per_forward: int = 32768  # padded tokens per micro-batch forward inside one /score call
    startup_timeout_s: float = 600.0  # backend=sglang: how long to wait for the server's /health
    sglang_args: str = ""  # backend=sglang: extra flags for `python -m sglang.launch_server` (--tp comes from tp)
