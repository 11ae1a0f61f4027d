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


def _bad_override(e: Exception) -> ConfigError:
    return ConfigError(f"bad config override: {e}\n(see `asyncopd config` for every key and its default)")


def _compose(overrides: list[str], hydra_config: bool = False):
    register_schema()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra_config)
    except (HydraException, OmegaConfBaseException) as e:
        raise _bad_override(e) from None


def compose_config(overrides: list[str] | None = None) -> Config:
    raw = _compose(list(overrides or []))
    try:
        return OmegaConf.to_object(raw)
    except OmegaConfBaseException as e:
        raise _bad_override(e) from None


def sweep_dir(overrides: list[str]) -> str:
    """`hydra.sweep.dir` as configs/ and `overrides` set it, resolved now; composing Hydra's own config also checks
    the `hydra.*` and `hydra/...` overrides (a launcher whose plugin is not installed is named here)."""
    try:
        return str(_compose(overrides, hydra_config=True).hydra.sweep.dir)
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad hydra.sweep.dir: {e}") from None


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
