"""SGLang's /generate JSON contract as the contract tests use it: the release's own decoders when its wheel is here,
else the fixture tests/sglang_contract/sglang-<version>.json taken from the same file (see generate.py there).

`make test` fetches the wheel (`pip download --no-deps`, 39 MB, ~2 s) into .cache/sglang/; offline, a failed fetch
leaves the fixture. `contract().decode(name, value)` raises ContractError where SGLang's decoder would refuse
`value` as the JSON of `name` (a struct or alias of sglang.api.v1, e.g. "GenerateRequest", "GenerateResponse").
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.sglang_contract.generate import HERE, fixture_path, load_module

ROOT = Path(__file__).resolve().parents[1]
VERSION = next(p.stem.removeprefix("sglang-") for p in sorted(HERE.glob("sglang-*.json")))


class ContractError(AssertionError):
    pass


def find_wheel() -> Path | None:
    """$ASYNCOPD_SGLANG_WHEEL, else the wheel of VERSION under .cache/sglang/ (fetched by `make test`)."""
    env = os.environ.get("ASYNCOPD_SGLANG_WHEEL")
    if env:
        return Path(env)
    found = sorted((ROOT / ".cache" / "sglang").glob(f"sglang-{VERSION}-*.whl"))
    return found[0] if found else None


class Contract:
    """decode(name, value) through `check` (the real decoders or the fixture checker)."""

    def __init__(self, source: str, check: Callable[[str, Any], None]):
        self.source = source  # "wheel <path>" | "fixture <path>"
        self._check = check

    def decode(self, name: str, value: Any) -> None:
        self._check(name, value)


def _real(wheel: Path) -> Contract:
    module = load_module(wheel)

    def check(name: str, value: Any) -> None:
        try:
            getattr(module, f"decode_{name}")(value)
        except module.JsonContractError as e:
            raise ContractError(f"{name}: {e}") from None

    return Contract(f"wheel {wheel}", check)


class FixtureChecker:
    """The fixture's types applied to a JSON value, the way the generated decoders apply them."""

    def __init__(self, data: dict[str, Any]):
        self.structs, self.aliases = data["structs"], data["aliases"]

    def __call__(self, name: str, value: Any) -> None:
        self.check(value, {"ref": name}, name)

    def check(self, v: Any, desc: Any, path: str) -> None:
        def fail(what: str):
            raise ContractError(f"{path}: expected {what}, got {v!r:.200}")

        if desc == "any":
            return
        if desc == "null":
            return None if v is None else fail("null")
        if desc == "bool":
            return None if isinstance(v, bool) else fail("a boolean")
        if desc == "int":
            return None if isinstance(v, int) and not isinstance(v, bool) else fail("an integer")
        if desc == "float":
            return None if isinstance(v, (int, float)) and not isinstance(v, bool) else fail("a number")
        if desc == "str":
            return None if isinstance(v, str) else fail("a string")
        if "list" in desc:
            if not isinstance(v, list):
                fail("a sequence")
            for i, e in enumerate(v):
                self.check(e, desc["list"], f"{path}[{i}]")
            return None
        if "map" in desc:
            if not isinstance(v, dict):
                fail("a map")
            for k, e in v.items():
                self.check(e, desc["map"], f"{path}.{k}")
            return None
        if "union" in desc:
            errors = []
            for arm in desc["union"]:
                try:
                    return self.check(v, arm, path)
                except ContractError as e:
                    errors.append(str(e))
            raise ContractError(f"{path}: matches no arm of {desc['union']}: {errors}")
        ref = desc["ref"]
        if ref in self.aliases:
            alias = self.aliases[ref]
            tagged = alias.get("tagged")
            if tagged is not None:  # an object tagged by "type"; unknown tags pass through as a map
                if not isinstance(v, dict):
                    fail("a map")
                return self._struct(v, tagged[v["type"]], path) if v.get("type") in tagged else None
            return self.check(v, alias["type"], path)
        return self._struct(v, ref, path)

    def _struct(self, v: Any, name: str, path: str) -> None:
        s = self.structs[name]
        if s["shape"] == "array":
            if not isinstance(v, list) or len(v) != len(s["fields"]):
                raise ContractError(f"{path}: expected a {len(s['fields'])}-element array ({name}), got {v!r:.200}")
            for f, e in zip(s["fields"], v, strict=True):
                self.check(e, f["type"], f"{path}.{f['name']}")
            return
        if not isinstance(v, dict):
            raise ContractError(f"{path}: expected an object ({name}), got {v!r:.200}")
        fields = {f["name"]: f for f in s["fields"]}
        for key, e in v.items():
            f = fields.get(key)
            if f is None:
                if s["unknown_keys"] == "rejected":
                    raise ContractError(f"{path}: unknown field `{key}` ({name} rejects unknown keys)")
                continue
            if e is None and f["nullable"]:
                continue
            self.check(e, f["type"], f"{path}.{key}")
            if f["unsigned"] and isinstance(e, int) and e < 0:
                raise ContractError(f"{path}.{key}: expected an unsigned integer, got {e}")


@functools.cache
def contract() -> Contract:
    wheel = find_wheel()
    if wheel is not None and wheel.is_file():
        try:
            return _real(wheel)
        except ImportError:  # msgspec missing: the fixture still checks
            pass
    path = fixture_path(VERSION)
    return Contract(f"fixture {path}", FixtureChecker(json.loads(path.read_text())))
