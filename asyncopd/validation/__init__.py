"""The one validation home: every config rule (`rules`), the will-it-fit plan (`plan`), and `load_config`,
which composes a config and refuses one that cannot run before anything starts."""

from asyncopd.config.load import compose_config
from asyncopd.config.schema import Config
from asyncopd.validation.rules import validate


def load_config(overrides: list[str] | None = None) -> Config:
    """Hydra-compose configs/ with `overrides` and validate the result (ConfigError names the field)."""
    return validate(compose_config(overrides))
