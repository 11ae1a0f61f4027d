"""The errors a user can cause and a role can report, importable from anywhere below the roles."""


class ConfigError(ValueError):
    """A config value (or a path, layout or backend combination it names) that cannot work.

    The message names the field and the fix; the CLI prints it and exits 2 without a traceback."""


class StalenessViolation(RuntimeError):
    """A sample reached the learner more than `pipeline.max_staleness` versions behind: admission is broken."""
