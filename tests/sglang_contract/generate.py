"""Write SGLang's /generate JSON contract, read from a release's own definitions, as a JSON fixture.

    python tests/sglang_contract/generate.py path/to/sglang-0.5.23-*.whl

SGLang ships its HTTP JSON contract as one generated file, `sglang/api/v1/api_types.py` (msgspec Structs and
the `decode_*` functions its server runs on every /generate body). The contract tests load that file straight
from the wheel when it is at hand (`make test` fetches it; see tests/_sglang_contract.py); this fixture is what
they check against when it is not (no network). It records facts, not code: each struct's fields with their JSON
types, which accept null, which are unsigned, whether unknown keys are rejected, positional arrays, tagged
unions, and where in the file each definition is, with the file's sha256, so a version bump is a reviewable diff.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
API_FILE = "sglang/api/v1/api_types.py"
PRIMITIVES = {"int": "int", "float": "float", "str": "str", "bool": "bool", "Any": "any"}


def load_module(wheel: str | Path):
    """`sglang.api.v1.api_types` of `wheel`, executed from its source alone (it needs only msgspec)."""
    import importlib.util

    source = zipfile.ZipFile(wheel).read(API_FILE).decode()
    version = wheel_version(wheel)
    name = f"sglang_api_types_{version.replace('.', '_')}"
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    module.__dict__["__source__"] = source
    sys.modules[name] = module  # msgspec resolves the string annotations through the module
    exec(compile(source, f"{wheel}!{API_FILE}", "exec"), module.__dict__)
    return module


def wheel_version(wheel: str | Path) -> str:
    return Path(wheel).name.split("-")[1]


def _split_args(text: str) -> list[str]:
    """Top-level comma-separated parts of `A, B[C, D], E`."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        depth += ch == "["
        depth -= ch == "]"
        cur += ch
    return [*parts, cur.strip()] if cur.strip() else parts


def type_desc(annotation: str) -> Any:
    """JSON type descriptor of an annotation string: "int" | "float" | "str" | "bool" | "any" | "null" |
    {"list": d} | {"map": d} | {"union": [d, ...]} | {"ref": "StructOrAlias"}."""
    a = annotation.strip()
    if a in PRIMITIVES:
        return PRIMITIVES[a]
    if a == "None":
        return "null"
    m = re.fullmatch(r"(\w+)\[(.*)\]", a)
    if not m:
        return {"ref": a}
    head, args = m.group(1), _split_args(m.group(2))
    if head == "Optional":
        return {"union": [type_desc(args[0]), "null"]}
    if head == "Union":
        return {"union": [type_desc(x) for x in args]}
    if head == "List":
        return {"list": type_desc(args[0])}
    if head == "Dict":
        return {"map": type_desc(args[1])}
    if head == "Tuple":
        return {"list": "any"}
    raise ValueError(f"unhandled annotation {annotation!r}")


def _decoder_facts(source: str, name: str) -> dict[str, dict[str, bool]]:
    """Per field of `decode_<name>`: does it accept null, is it unsigned (from the generated decoder's lines)."""
    m = re.search(rf"^def decode_{name}\(.*?(?=^def |\Z)", source, re.S | re.M)
    facts: dict[str, dict[str, bool]] = {}
    if not m:
        return facts
    for key, body in re.findall(r'key == "(\w+)":\n\s+(.*)', m.group(0)):
        facts[key] = {"nullable": "if x is None else" in body or body.endswith("= x"),
                      "unsigned": "_expect_uint" in body}
    return facts


def _tags(source: str, alias: str) -> dict[str, str]:
    """A tagged union's {tag: struct}, from `decode_<alias>`."""
    m = re.search(rf"^def decode_{alias}\(.*?(?=^def |\Z)", source, re.S | re.M)
    return dict(re.findall(r'tag == "(\w+)":\s+try:\s+return (\w+)\(', m.group(0))) if m else {}


def contract(module) -> dict[str, Any]:
    """The fixture: structs and aliases of `module` (see the module docstring)."""
    import msgspec

    source: str = module.__dict__["__source__"]
    lines = source.splitlines()
    structs: dict[str, Any] = {}
    for name, cls in vars(module).items():
        if not (inspect.isclass(cls) and issubclass(cls, msgspec.Struct) and cls.__module__ == module.__name__):
            continue
        doc = inspect.getdoc(cls) or ""
        line = next(i for i, text in enumerate(lines, 1) if text.startswith(f"class {name}("))
        facts = _decoder_facts(source, name)
        fields = []
        for f in msgspec.structs.fields(cls):
            default = None if f.default is msgspec.NODEFAULT else f.default
            fields.append({"name": f.name, "type": type_desc(cls.__annotations__[f.name]),
                           "default": default if not isinstance(default, msgspec.Struct) else None,
                           **facts.get(f.name, {"nullable": False, "unsigned": False})})
        structs[name] = {"line": line, "doc": doc.splitlines()[0] if doc else "",
                         "shape": "array" if "positional array" in doc else "object",
                         "unknown_keys": "rejected" if "unknown keys rejected" in doc else "ignored",
                         "fields": fields}
    aliases: dict[str, Any] = {}
    for i, text in enumerate(lines, 1):
        m = re.fullmatch(r"(\w+) = ((?:Union|List|Optional|Dict|Tuple)\[.*\]|\w+)", text)
        if not m or m.group(1) in structs or m.group(1).isupper():
            continue
        entry: dict[str, Any] = {"line": i, "type": type_desc(m.group(2))}
        if lines[i - 2].startswith("#") and "tagged by its type key" in lines[i - 2]:
            entry["tagged"] = _tags(source, m.group(1))
        aliases[m.group(1)] = entry
    return {"structs": structs, "aliases": aliases}


def fixture(wheel: str | Path) -> dict[str, Any]:
    module = load_module(wheel)
    source = module.__dict__["__source__"]
    return {"sglang_version": wheel_version(wheel), "source_file": API_FILE,
            "source_sha256": hashlib.sha256(source.encode()).hexdigest(),
            "generated_by": "tests/sglang_contract/generate.py", **contract(module)}


def fixture_path(version: str) -> Path:
    return HERE / f"sglang-{version}.json"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    data = fixture(argv[0])
    out = fixture_path(data["sglang_version"])
    out.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out} ({len(data['structs'])} structs, {len(data['aliases'])} aliases)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
