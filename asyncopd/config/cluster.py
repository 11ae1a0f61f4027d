from dataclasses import dataclass


@dataclass
class ClusterConfig:
    """Where the Ray cluster is: empty address starts a private local one on loopback."""

    ray_address: str = ""
    num_cpus: int = 2
    namespace: str = "asyncopd"
    include_dashboard: bool = False
