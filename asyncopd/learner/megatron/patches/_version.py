"""The megatron-core version every patch here was written against, and the check that enforces it."""

import warnings

PINNED_VERSION = "0.16.1"


class MegatronVersionError(RuntimeError):
    pass


def check_megatron_version(strict: bool = True) -> str:
    """Return megatron-core's version; refuse (strict) or warn on anything but the pinned one.

    The patches replace private megatron-core internals (module globals, tracker classes) whose names and
    behaviour change between releases, so applying them to another version could silently do nothing or the
    wrong thing.
    """
    import megatron.core

    version = getattr(megatron.core, "__version__", "unknown")
    if version != PINNED_VERSION:
        msg = (f"the megatron patches are written for megatron-core=={PINNED_VERSION}, found {version}: "
               f"`pip install megatron-core=={PINNED_VERSION}` (pyproject pins it) or re-check every patch "
               "in asyncopd/learner/megatron/patches/ against the new source")
        if strict:
            raise MegatronVersionError(msg)
        warnings.warn(msg, stacklevel=2)
    return version
