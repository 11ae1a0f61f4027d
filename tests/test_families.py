"""Model families beyond the demo's Qwen2: Qwen3 (q/k norms, head_dim apart from hidden / heads) and Llama 3
(no QKV bias, llama3 RoPE scaling), as tiny random checkpoints built from their configs (no downloads), through
the embedded rollout engine over HTTP, the teacher scorer, and the hf learner."""

import numpy as np
import pytest
import torch

from asyncopd.model.scorer import score_sequences
from asyncopd.rollout.client import SGLangClient
from asyncopd.rollout.engine import RolloutEngine
from asyncopd.rollout.http_server import RolloutServer
from tests._learner_fixtures import ESTIMATOR, learner_config, make_batch, make_trainer
from tests._serving_fixtures import FAMILIES, VOCAB, full_logprobs, save_tiny, tiny_model
from tests._tolerances import logprob_tol

PROMPT = [3, 4, 5, 6]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    m = tiny_model(5, request.param, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    assert m.config.model_type == request.param
    return m


def test_the_families_differ_where_they_should(model):
    names = {n for n, _ in model.named_parameters()}
    family = model.config.model_type
    assert any(n.endswith("q_proj.bias") for n in names) == (family == "qwen2")
    assert any(n.endswith("q_norm.weight") for n in names) == (family == "qwen3")
    if family == "qwen3":  # head_dim 16 with hidden 32 and 4 heads: q is 64 wide, not 32
        assert model.model.layers[0].self_attn.q_proj.weight.shape == (64, 32)
    if family == "llama":
        assert model.config.rope_scaling["rope_type"] == "llama3"


def test_engine_logprobs_equal_hf(model):
    server = RolloutServer(RolloutEngine(model, "")).start()
    try:
        client = SGLangClient(server.url, timeout_s=60)
        out = client.generate_raw({"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 12, "temperature": 0},
                                   "return_logprob": True, "top_logprobs_num": 3})
        ids = out["output_ids"]
        lp = full_logprobs(model, PROMPT + ids)[len(PROMPT) - 1:len(PROMPT) + len(ids) - 1]
        tol = logprob_tol(model, len(PROMPT) + len(ids))  # float32 KV-cache decode vs one full forward
        assert ids == lp.argmax(-1).tolist()  # greedy
        np.testing.assert_allclose([e[0] for e in out["meta_info"]["output_token_logprobs"]],
                                   lp.gather(1, torch.tensor(ids)[:, None])[:, 0].numpy(), atol=tol)
        sampled = client.generate([PROMPT, PROMPT[:2]], max_new_tokens=10, temperature=1.0, seed=7)
        for prompt, r in zip([PROMPT, PROMPT[:2]], sampled, strict=True):
            ref = full_logprobs(model, prompt + r.response_ids.tolist())[len(prompt) - 1:-1]
            want = ref.gather(1, torch.as_tensor(r.response_ids, dtype=torch.long)[:, None])[:, 0].numpy()
            np.testing.assert_allclose(r.logprobs, want, atol=logprob_tol(model, len(prompt) + r.num_tokens))
    finally:
        server.stop()


def test_teacher_scores_equal_brute_force(model):
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, VOCAB, size=n).tolist() for n in (7, 11, 4)]
    starts = [2, 5, 1]
    res = score_sequences(model, seqs, starts, 4)
    tol = logprob_tol(model, max(len(s) for s in seqs))  # float32: padded batch vs one forward per row
    for i, (s, st) in enumerate(zip(seqs, starts, strict=True)):
        a, b = res.offsets[i], res.offsets[i + 1]
        rows = full_logprobs(model, s)[st - 1:len(s) - 1]
        top_v, top_i = torch.topk(rows, 4, dim=-1)
        np.testing.assert_array_equal(res.topk_ids[a:b], top_i.numpy())
        np.testing.assert_allclose(res.topk_logprobs[a:b], top_v.numpy(), atol=tol)
        tok = rows.gather(1, torch.tensor(s[st:])[:, None])[:, 0].numpy()
        np.testing.assert_allclose(res.token_logprob[a:b], tok, atol=tol)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_learner_trains_and_exports_hf_names(family, tmp_path):
    ckpt = save_tiny(tmp_path / family, 2, family, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    trainer = make_trainer(learner_config(lr=1e-2), ESTIMATOR, str(ckpt), max_staleness=10)
    losses = [trainer.train_step(make_batch()).metrics["loss"] for _ in range(4)]
    assert losses[-1] < losses[0] and trainer.version == 4
    exported = {n: t for bucket in trainer.named_weights_for_rollout(1 << 20) for n, t in bucket}
    # the names an engine of this family loads from the checkpoint, every parameter once
    family_cls = type(tiny_model(0, family))
    assert set(exported) == {n for n, _ in family_cls.from_pretrained(ckpt).named_parameters()}
    trainer.save(str(tmp_path / "out"))  # and what it saves is what it exports
    for name, p in family_cls.from_pretrained(tmp_path / "out").named_parameters():
        assert torch.equal(p, exported[name]), name
