"""Compose the Hydra config (schema + groups + overrides) into a `Config` (asyncopd.validation checks it)."""

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from asyncopd.config.schema import Config
from asyncopd.core.errors import ConfigError


def config_dir() -> Path:
    """The repo's configs/ (or $ASYNCOPD_CONFIG_DIR for an installed package with its own configs)."""
    env = os.environ.get("ASYNCOPD_CONFIG_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "configs"


def register_schema() -> None:
    """configs/config.yaml's defaults start from `schema`: the structured Config, stored before any compose."""
    ConfigStore.instance().store(name="schema", node=Config)


def compose_config(overrides: list[str] | None = None) -> Config:
    register_schema()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            raw = compose(config_name="config", overrides=list(overrides or []))
        cfg = OmegaConf.to_object(raw)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(
            f"bad config override: {e}\n(see `asyncopd config` for every key and its default)"
        ) from None
    return cfg


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
