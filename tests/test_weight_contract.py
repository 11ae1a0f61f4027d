"""Our weight-sync requests are SGLang 0.5.23's own request types, field for field.

SGLang decodes each weight-update body into a msgspec Struct of `sglang/srt/managers/io_struct.py` and silently
drops keys the Struct lacks (so a `commit` key meant to stage a bucket did nothing there). That module needs the
GPU stack to import, so its definitions are read with `ast` from the release's source: straight from the wheel when
it is here (tests/_sglang_contract.find_wheel), else from the fixture tests/sglang_contract/weight-requests-<version>
.json written from it by

    python tests/test_weight_contract.py path/to/sglang-0.5.23-*.whl

Every body the client sends (the sync's too) must name only fields of its Struct, carry the required ones, and
give each a value of its type; our engine must answer the bodies SGLang's own clients send (defaults only).
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

from asyncopd.rollout.client import SGLangClient
from asyncopd.rollout.engine import RolloutEngine
from asyncopd.rollout.http_server import RolloutServer
from asyncopd.weights.broadcast import FLATTENED, bucket_requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests._serving_fixtures import tiny_model  # noqa: E402
from tests._sglang_contract import VERSION, find_wheel  # noqa: E402

IO_STRUCT = "sglang/srt/managers/io_struct.py"
# endpoint -> the Struct SGLang's http_server.py decodes its body into (0.5.23)
ENDPOINTS = {
    "/init_weights_update_group": "InitWeightsUpdateGroupReqInput",
    "/update_weights_from_distributed": "UpdateWeightsFromDistributedReqInput",
    "/destroy_weights_update_group": "DestroyWeightsUpdateGroupReqInput",
    "/begin_weight_update": "BeginWeightUpdateReqInput",
    "/end_weight_update": "EndWeightUpdateReqInput",
    "/update_weight_version": "UpdateWeightVersionReqInput",
    "/pause_generation": "PauseGenerationReqInput",
    "/continue_generation": "ContinueGenerationReqInput",
}
FIXTURE = ROOT / "tests" / "sglang_contract" / f"weight-requests-{VERSION}.json"


def read_structs(source: str) -> dict[str, dict[str, dict]]:
    """{Struct: {field: {"type": annotation, "required": bool}}} for ENDPOINTS' Structs and their BaseReq fields."""
    classes = {n.name: n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)}

    def fields(name: str) -> dict[str, dict]:
        node = classes[name]
        out: dict[str, dict] = {}
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                out.update(fields(base.id))
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                out[stmt.target.id] = {"type": ast.unparse(stmt.annotation), "required": stmt.value is None}
        return out

    return {name: fields(name) for name in sorted(set(ENDPOINTS.values()))}


def write_fixture(wheel: str) -> Path:
    source = zipfile.ZipFile(wheel).read(IO_STRUCT).decode()
    FIXTURE.write_text(json.dumps({
        "sglang_version": Path(wheel).name.split("-")[1], "source_file": IO_STRUCT,
        "source_sha256": hashlib.sha256(source.encode()).hexdigest(),
        "generated_by": "python tests/test_weight_contract.py <wheel>", "structs": read_structs(source)},
        indent=1, sort_keys=True) + "\n")
    return FIXTURE


@pytest.fixture(scope="module")
def structs() -> dict[str, dict[str, dict]]:
    wheel = find_wheel()
    if wheel is not None and wheel.exists():
        return read_structs(zipfile.ZipFile(wheel).read(IO_STRUCT).decode())
    return json.loads(FIXTURE.read_text())["structs"]


def test_fixture_matches_the_release():
    wheel = find_wheel()
    if wheel is None or not wheel.exists():
        pytest.skip("no sglang wheel here: the fixture stands in for it")
    source = zipfile.ZipFile(wheel).read(IO_STRUCT).decode()
    saved = json.loads(FIXTURE.read_text())
    assert saved["source_sha256"] == hashlib.sha256(source.encode()).hexdigest()
    assert saved["structs"] == read_structs(source)


def conforms(value: Any, annotation: str) -> bool:
    """Whether JSON `value` decodes as `annotation` (the annotation forms io_struct's weight Structs use)."""
    a = annotation.strip()
    if a in ("str", "int", "float", "bool"):
        kinds = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}[a]
        return isinstance(value, kinds) and (a == "bool" or not isinstance(value, bool))
    m = re.fullmatch(r"(\w+)\[(.*)\]", a)
    assert m, f"annotation {a!r} not understood: extend conforms()"
    head, arg = m.groups()
    if head == "Optional":
        return value is None or conforms(value, arg)
    if head == "List":
        return isinstance(value, list) and all(conforms(v, arg) for v in value)
    if head == "Literal":
        return value in ast.literal_eval(f"[{arg}]")
    raise AssertionError(f"annotation {a!r} not understood: extend conforms()")


def check_body(structs: dict, path: str, body: dict) -> None:
    fields = structs[ENDPOINTS[path]]
    unknown = set(body) - set(fields)
    assert not unknown, f"{path}: SGLang's {ENDPOINTS[path]} has no field {sorted(unknown)}: it would drop them"
    missing = {f for f, d in fields.items() if d["required"]} - set(body)
    assert not missing, f"{path}: required {sorted(missing)} missing"
    for key, value in body.items():
        assert conforms(value, fields[key]["type"]), f"{path}: {key}={value!r} is not a {fields[key]['type']}"


def test_client_bodies_are_sglang_requests(structs, monkeypatch):
    sent: list[tuple[str, dict]] = []
    monkeypatch.setattr(SGLangClient, "post_json", lambda self, path, payload=None, **kw: sent.append(
        (path, payload)) or {"success": True})
    c = SGLangClient("http://127.0.0.1:1")
    c.init_weights_update_group(master_address="127.0.0.1", master_port=29500, rank_offset=3, world_size=4,
                                group_name="g", backend="nccl")
    c.begin_weight_update()
    named = [("model.embed_tokens.weight", torch.zeros(4, 2)), ("model.norm.weight", torch.zeros(2))]
    for fmt in ("", FLATTENED):  # the sync's buckets, as the learner announces them
        for bucket in bucket_requests([named], "g", torch.bfloat16, fmt):
            c.update_weights_from_distributed(**bucket, flush_cache=False, weight_version=7)
    c.end_weight_update()
    c.update_weight_version(8, abort_all_requests=False)
    for mode in ("abort", "retract", "in_place"):
        c.pause_generation(mode)
    c.continue_generation()
    c.destroy_weights_update_group("g")
    assert {p for p, _ in sent} == set(ENDPOINTS)
    for path, body in sent:
        check_body(structs, path, body)
    with pytest.raises(AssertionError, match="has no field \\['commit'\\]"):  # what the old client sent
        check_body(structs, "/update_weights_from_distributed", {**sent[2][1], "commit": True})


def test_engine_answers_sglang_default_bodies(structs):
    """The bodies slime and SGLang's own HTTP engine send (every optional field left out) work here too."""
    server = RolloutServer(RolloutEngine(tiny_model(0), "")).start()
    try:
        def post(path: str, body: dict | None) -> requests.Response:
            if body is not None:
                check_body(structs, path, body)
            return requests.post(server.url + path, json=body, timeout=30)

        assert post("/pause_generation", {}).json() == {"message": "Generation paused successfully.", "status": "ok"}
        assert post("/continue_generation", {}).json()["status"] == "ok"
        assert post("/pause_generation", None).status_code == 200  # slime posts json={}, others nothing
        assert post("/continue_generation", None).status_code == 200
        assert post("/begin_weight_update", {"selector": "all"}).json() == {"success": True, "message": "Success"}
        assert post("/end_weight_update", {}).json() == {"success": True, "message": "Success"}
        r = post("/update_weight_version", {"new_version": "12"})
        assert r.json() == {"success": True, "message": "Weight version updated to 12", "new_version": "12"}
        assert requests.get(server.url + "/model_info", timeout=30).json()["weight_version"] == "12"
        r = requests.post(server.url + "/begin_weight_update", json={"selector": "everything"}, timeout=30)
        assert r.status_code == 400 and "selector" in r.json()["message"]
    finally:
        server.stop()


if __name__ == "__main__":
    print(write_fixture(sys.argv[1]))
