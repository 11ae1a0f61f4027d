"""Several named teachers: the config rules (`teachers`, `data.teacher_key`), the data column that picks each
sample's teacher, and the router that scores each rollout on its own teacher over real /score servers."""

import json

import numpy as np
import pytest
import requests
import torch

from asyncopd.cli.main import main
from asyncopd.config.load import compose_config
from asyncopd.config.schema import DataConfig
from asyncopd.core.errors import ConfigError, TeacherDegenerate
from asyncopd.data.dataset import load_prompts
from asyncopd.data.tokenizer import VOCAB as TOKENS
from asyncopd.data.tokenizer import load_tokenizer
from asyncopd.model.scorer import score_sequences
from asyncopd.teacher import wire
from asyncopd.teacher.client import TeacherClient
from asyncopd.teacher.router import TeacherRouter
from asyncopd.teacher.server import TeacherServer
from asyncopd.validation.plan import plan
from asyncopd.validation.rules import problems, validate
from tests._serving_fixtures import VOCAB, tiny_model
from tests.conftest import make_artifacts
from tests.test_teacher_http import _random_rollouts

TWO = ["+teachers={a: {}, b: {}}", "data.teacher_key=teacher"]


def fields(overrides: list[str]) -> set[str]:
    return {p.field for p in problems(compose_config(overrides))}


def test_teachers_config_rules_name_the_teacher():
    assert fields([]) == set() and fields(TWO) == set()  # the single `teacher` keeps working; two are routable
    assert fields(TWO[:1]) == {"data.teacher_key"}  # two teachers and no column to choose between them
    assert fields(["data.teacher_key=teacher"]) == {"data.teacher_key"}  # a column with no `teachers` to name
    assert fields(["+teachers={only: {}}"]) == set()  # one named teacher scores every sample
    assert fields([*TWO, "teachers.b.backend=bogus"]) == {"teachers.b.backend"}
    assert fields([*TWO, "teachers.b.tp=2"]) == {"teachers.b.tp"}  # the embedded teacher is one shard
    assert fields([*TWO, "teachers.a.replicas=0", "teachers.b.wire_dtype=int8"]) == {"teachers.a.replicas",
                                                                                   "teachers.b.wire_dtype"}
    # per-position query scores: each teacher's backend must give them
    assert fields([*TWO, "estimator=mc_rkl", "teachers.b.backend=sglang"]) == {"teachers.b.backend"}


def test_the_plan_has_a_role_per_teacher_and_counts_their_gpus():
    base = ["experiment=qwen3_1p7b_from_30b", "data.teacher_key=teacher"]
    sglang = "backend: sglang, gpus_per_replica: 1"
    cfg = compose_config([*base, f"+teachers={{a: {{{sglang}}}, b: {{{sglang}, replicas: 2}}}}"])
    roles = {p.role: p for p in plan(cfg).roles}
    assert set(roles) == {"learner", "rollout", "teachers.a", "teachers.b"}
    assert roles["teachers.a"].gpus == 1 and roles["teachers.b"].gpus == 2
    crowded = compose_config([*base, f"+teachers={{a: {{{sglang}}}, b: {{{sglang}, replicas: 6}}}}"])
    found = {p.field: p.message for p in problems(crowded)}
    assert "teachers.a 1 + teachers.b 6" in found["cluster.nodes"]


def test_each_teachers_checkpoint_and_tokenizer_are_checked_before_anything_starts(tiny_artifacts, tmp_path):
    other = make_artifacts(tmp_path / "other", (*TOKENS, "*"))  # another tokenizer
    base = [f"model.artifacts_dir={tiny_artifacts}", "data.teacher_key=teacher"]
    validate(compose_config([*base, f"+teachers={{a: {{}}, b: {{model_path: {tiny_artifacts / 'teacher'}}}}}"]),
             host=True)
    with pytest.raises(ConfigError, match="tokenizers differ") as e:
        validate(compose_config([*base, f"+teachers={{a: {{}}, b: {{model_path: {other / 'teacher'}}}}}"]),
                 host=True)
    assert "teachers.b.model_path" in str(e.value) and str(other / "teacher" / "tokenizer.json") in str(e.value)
    with pytest.raises(ConfigError, match="teachers.b.model_path='/nonexistent' holds no Hugging Face checkpoint"):
        validate(compose_config([*base, "+teachers={a: {}, b: {model_path: /nonexistent}}"]), host=True)


def _rows(names: list[str | None]) -> list[dict]:
    return [{"prompt": f"{i}+1", "answer": str(i + 1), "teacher": n} for i, n in enumerate(names)]


def test_the_teacher_column_routes_and_unknown_names_fail_at_load(tmp_path, tiny_artifacts):
    tok = load_tokenizer(tiny_artifacts / "student")
    f = tmp_path / "train.jsonl"

    def load(names, teachers=("a", "b"), key="teacher"):
        f.write_text("".join(json.dumps(r) + "\n" for r in _rows(names)))
        return load_prompts([str(f)], DataConfig(teacher_key=key), tok, tokenizer_path=str(tiny_artifacts / "student"),
                            max_prompt_length=64, field="data.train_files", teachers=teachers)

    assert [s.teacher for s in load(["a", "b", "b"]).samples] == ["a", "b", "b"]
    assert [s.teacher for s in load(["a", "c"], teachers=None).samples] == ["", ""]  # a split no teacher scores
    with pytest.raises(ConfigError) as e:
        load(["a", "b", "c"])
    assert f"{f} row 2 names teacher 'c'" in str(e.value) and "['a', 'b']" in str(e.value)
    with pytest.raises(ConfigError, match="row 1 names teacher None"):
        load(["a", None])
    with pytest.raises(ConfigError, match="data.teacher_key='expert' is not a column"):
        load(["a"], key="expert")


def test_an_unknown_teacher_in_the_data_exits_2_before_anything_starts(tiny_artifacts, tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in _rows(["a", "b", "a", "math"])))
    code = main(["train", f"model.artifacts_dir={tiny_artifacts}", f"run.dir={tmp_path / 'run'}",
                 f"data.train_files={train}", *TWO])
    err = capsys.readouterr().err
    assert code == 2 and "row 3 names teacher 'math'" in err and "['a', 'b']" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def two_teachers():
    """Two different models, each behind its own /score server: a score says which one computed it."""
    models = {"a": tiny_model(3), "b": tiny_model(4)}
    servers = {name: TeacherServer(m).start() for name, m in models.items()}
    yield models, servers
    for s in servers.values():
        s.stop()


def test_the_router_scores_each_rollout_on_its_teacher_in_order(two_teachers):
    models, servers = two_teachers
    router = TeacherRouter({n: TeacherClient(s.url, vocab_size=VOCAB, wire_dtype="float16" if n == "b" else "float32")
                            for n, s in servers.items()})
    rollouts = _random_rollouts(10, seed=11)
    names = ["a", "b", "b", "a", "b", "a", "a", "b", "b", "b"]
    for r, n in zip(rollouts, names, strict=True):
        r.metadata["teacher"] = n
    scores = router.score(rollouts, top_k=3)
    for r, n, sc in zip(rollouts, names, scores, strict=True):
        want = score_sequences(models[n], [np.concatenate([r.prompt_ids, r.response_ids])], [len(r.prompt_ids)], 3)
        np.testing.assert_array_equal(sc.topk_ids, want.topk_ids)
        np.testing.assert_allclose(sc.token_logprob, want.token_logprob, rtol=1e-3, atol=1e-4)  # b: a float16 wire
    per = router.last_stats["teachers"]
    for n in ("a", "b"):
        mine = [r for r, m in zip(rollouts, names, strict=True) if m == n]
        assert per[n]["samples"] == len(mine) and per[n]["tokens"] == sum(r.num_tokens for r in mine)
        assert per[n]["seconds"] > 0
        # the bytes are the answer's HTTP body: the same request posted by hand gets a body of that length
        body = router.clients[n]._request(mine, 3, False, False)
        answer = requests.post(servers[n].url + "/score", data=body, headers={"Content-Type": wire.CONTENT_TYPE},
                               timeout=30)
        assert per[n]["bytes"] == len(answer.content)
    tokens = sum(r.num_tokens for r in rollouts)
    assert router.last_stats["bytes_per_token"] == (per["a"]["bytes"] + per["b"]["bytes"]) / tokens
    router.score(rollouts[:2], top_k=3)
    assert router.totals["a"]["samples"] == 4 + 1 and router.totals["b"]["samples"] == 6 + 1
    rollouts[0].metadata["teacher"] = "c"
    with pytest.raises(ValueError, match=r"names teacher 'c'; the teachers are \['a', 'b'\]"):
        router.score(rollouts, top_k=3)


def test_the_router_names_the_teacher_whose_scores_are_degenerate(two_teachers):
    _, servers = two_teachers
    blank = TeacherServer(tiny_model(3)).start()
    try:
        with torch.no_grad():  # its weights are gone after it started: it still answers 200
            for p in blank.model.parameters():
                p.zero_()
        router = TeacherRouter({"a": TeacherClient(servers["a"].url, vocab_size=VOCAB),
                                "blank": TeacherClient(blank.url, vocab_size=VOCAB)})
        rollouts = _random_rollouts(8, seed=12)
        for i, r in enumerate(rollouts):
            r.metadata["teacher"] = "blank" if i % 2 else "a"
        with pytest.raises(TeacherDegenerate, match=f"teacher 'blank': teacher replica {blank.url}"):
            router.score(rollouts, top_k=3)
    finally:
        blank.stop()


def test_one_teacher_needs_no_column(two_teachers):
    _, servers = two_teachers
    router = TeacherRouter({"default": TeacherClient(servers["a"].url)})
    rollouts = _random_rollouts(3, seed=13)
    assert len(router.score(rollouts, top_k=2)) == 3 and router.last_stats["teachers"]["default"]["samples"] == 3
