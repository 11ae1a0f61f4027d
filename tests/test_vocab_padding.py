"""Teacher and student may pad their embeddings past the shared tokenizer's ids (Qwen3: 151669 tokens, 151936 rows)
and pad them differently: padded rows never reach a score, a sample or the learner's log pi, and the pair check goes
by the tokenizer.

The padded models here make every padded logit far larger than any real one, so a server that let padded rows
into its log-softmax would put them at the top of every top-k and sample them at almost every step, and a learner
that let them in would put almost all of pi's mass on them."""

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from asyncopd.config.schema import Config, LearnerConfig
from asyncopd.core.types import Rollout
from asyncopd.data.tokenizer import VOCAB as TOKENS
from asyncopd.data.tokenizer import build_tiny_tokenizer
from asyncopd.model.scorer import score_sequences
from asyncopd.net.client import ServerError
from asyncopd.pipeline.fleet import Fleet, VocabularyMismatch, check_vocabulary_pair
from asyncopd.rollout.client import SGLangClient
from asyncopd.rollout.engine import RolloutEngine
from asyncopd.rollout.http_server import RolloutServer
from asyncopd.teacher.client import TeacherClient
from asyncopd.teacher.router import TeacherRouter
from asyncopd.teacher.server import TeacherServer
from tests._learner_fixtures import ESTIMATOR, learner_config, make_batch, make_trainer
from tests._serving_fixtures import VOCAB, tiny_model
from tests._tolerances import FP32_ESTIMATOR, logit_tol, logprob_tol
from tests.conftest import TEST_THREADS

HIDDEN = 32  # tests._families: hidden_size
ROWS = VOCAB + 2 * HIDDEN  # one padded row per signed unit vector of the hidden space
PROMPTS = [[3, 4, 5], [6, 7], [8, 9, 10, 11, 12]]
assert len(TOKENS) == VOCAB


def padded_model(seed: int) -> torch.nn.Module:
    """A tiny model with ROWS embedding rows for VOCAB tokens; padded row 2i +- is +-C e_i.

    The final RMSNorm's output h has ||h|| = sqrt(d) (unit gains), so max_i |h_i| >= 1 and the largest padded logit
    is >= C; a real logit is <= ||h|| max_v ||W_v|| (Cauchy-Schwarz). C is ten times that bound."""
    model = tiny_model(seed, vocab_size=ROWS)
    w = model.get_output_embeddings().weight
    with torch.no_grad():
        c = 10 * HIDDEN ** 0.5 * float(w[:VOCAB].norm(dim=1).max())
        eye = torch.eye(HIDDEN) * c
        w[VOCAB:] = torch.stack([eye, -eye], 1).reshape(2 * HIDDEN, HIDDEN)
    return model


def unpadded_twin(model: torch.nn.Module) -> torch.nn.Module:
    """`model` without its padded rows: the same real rows and every other weight, VOCAB embedding rows."""
    twin = tiny_model(0)  # VOCAB rows; every weight is overwritten below
    twin.load_state_dict({name: t[:VOCAB] if name.endswith(("embed_tokens.weight", "lm_head.weight")) else t
                          for name, t in model.state_dict().items()})
    return twin


def checkpoint(path: Path, model: torch.nn.Module | None, tokens: tuple[str, ...] | None = TOKENS) -> Path:
    """`model` saved at `path` with the tiny tokenizer over `tokens` (None: no tokenizer files)."""
    (model or tiny_model(1)).save_pretrained(path)
    if tokens is not None:
        build_tiny_tokenizer(tokens).save_pretrained(path)
    return path


def real_logprobs(model, ids: list[int]) -> torch.Tensor:
    """Brute force, fp64: log-softmax over the VOCAB real rows only, at every position of one sequence."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits[:, :VOCAB], dim=-1)


@pytest.fixture(scope="module")
def teacher():
    return padded_model(3)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, teacher) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    return {"teacher": checkpoint(root / "teacher", teacher), "student": checkpoint(root / "student", None),
            "other": checkpoint(root / "other", tiny_model(2, vocab_size=VOCAB + 1), (*TOKENS, "*")),
            "bare": checkpoint(root / "bare", None, tokens=None),
            "unpadded": checkpoint(root / "unpadded", unpadded_twin(teacher), tokens=None)}


@pytest.fixture(scope="module")
def teacher_server(teacher, ckpts):
    s = TeacherServer(teacher, str(ckpts["teacher"])).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def padded_engine(teacher, ckpts):
    """The padded model as a student: the engine must sample and report real ids only."""
    s = RolloutServer(RolloutEngine(teacher, str(ckpts["teacher"]))).start()
    yield s
    s.stop()


def test_padded_rows_would_win_without_slicing(teacher):
    """The premise of every test below: scoring over all rows puts a padded id first at every position."""
    res = score_sequences(teacher, PROMPTS, [1, 1, 1], 1)
    assert (res.topk_ids[:, 0] >= VOCAB).all()


@pytest.mark.parametrize("chunk", [4096, 2])
def test_scorer_scores_the_tokenizer_ids_only(teacher, chunk):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, VOCAB, size=n).tolist() for n in (6, 9, 3)]
    starts = [2, 1, 3]
    total = sum(len(s) - st for s, st in zip(seqs, starts, strict=True))
    queries = rng.integers(0, VOCAB, size=(total, 3))
    res = score_sequences(teacher, seqs, starts, VOCAB + 5, queries, vocab_size=VOCAB, positions_per_chunk=chunk)
    assert res.topk_ids.shape == (total, VOCAB)  # top-k capped at the tokenizer's ids, not the rows
    assert ((res.topk_ids >= 0) & (res.topk_ids < VOCAB)).all()
    for i, (s, st) in enumerate(zip(seqs, starts, strict=True)):
        a, b = res.offsets[i], res.offsets[i + 1]
        want = real_logprobs(teacher, s)[st - 1:len(s) - 1]
        # float32, derived: the scorer's padded batch vs one forward of this row (the decoder's roundings), then a
        # log-softmax over the VOCAB = 19 real logits; the padded rows are sliced off and bound no compared value.
        # A padded row left in the softmax moves every logprob by about C (> 100), far past it.
        tol = logprob_tol(teacher, len(s), vocab=VOCAB)
        top_v, top_i = torch.topk(want, VOCAB, dim=-1)
        np.testing.assert_array_equal(res.topk_ids[a:b], top_i.numpy())
        np.testing.assert_allclose(res.topk_logprobs[a:b], top_v.numpy(), atol=tol)
        tok = want.gather(1, torch.as_tensor(s[st:]).unsqueeze(1)).squeeze(1)
        np.testing.assert_allclose(res.token_logprob[a:b], tok.numpy(), atol=tol)
        np.testing.assert_allclose(res.query_logprobs[a:b], want.gather(1, torch.as_tensor(queries[a:b])).numpy(),
                                   atol=tol)


def test_teacher_server_scores_and_accepts_the_tokenizer_ids_only(teacher, teacher_server):
    client = TeacherClient(teacher_server.url)
    info = client.model_info()[0]
    assert (info["vocab_size"], info["tokenizer_vocab_size"]) == (ROWS, VOCAB)
    ro = Rollout(prompt_ids=np.array([3, 4], np.int32), response_ids=np.array([5, 6, 7], np.int32),
                 logprobs=np.zeros(3, np.float32), version_start=0, version_end=0, finish_reason="length")
    (sc,) = client.score([ro], top_k=4)
    assert (sc.topk_ids < VOCAB).all()
    want = real_logprobs(teacher, [3, 4, 5, 6, 7])[1:4]
    tol = logprob_tol(teacher, 5, vocab=VOCAB)  # as in test_scorer_scores_the_tokenizer_ids_only
    np.testing.assert_allclose(sc.token_logprob, want.gather(1, torch.tensor([[5], [6], [7]])).squeeze(1).numpy(),
                               atol=tol)
    padded = Rollout(prompt_ids=np.array([3, VOCAB], np.int32), response_ids=np.array([5], np.int32),
                     logprobs=np.zeros(1, np.float32), version_start=0, version_end=0, finish_reason="length")
    with pytest.raises(ServerError, match=rf"input_ids must be in \[0, {VOCAB}\)"):
        client.score([padded], top_k=4)
    with pytest.raises(ServerError, match="top_k"):
        client.score([ro], top_k=VOCAB + 1)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_engine_never_samples_a_padded_id(teacher, padded_engine, temperature):
    client = SGLangClient(padded_engine.url, timeout_s=60)
    mc = 4 if temperature else 0
    rollouts = client.generate(PROMPTS * 4, max_new_tokens=8, temperature=temperature, mc_samples=mc,
                               student_top_k=5, seed=0)
    for p, r in zip(PROMPTS * 4, rollouts, strict=True):
        assert r.num_tokens > 0
        assert (r.response_ids < VOCAB).all() and (r.student_topk_ids < VOCAB).all()
        if mc:
            assert (r.mc_ids < VOCAB).all()
        want = real_logprobs(teacher, [*p, *r.response_ids.tolist()])[len(p) - 1:-1]
        # float32: the KV-cache decode vs one full forward, log-softmax over the 19 real ids (see the scorer test)
        tol = logprob_tol(teacher, len(p) + r.num_tokens, vocab=VOCAB)
        got = want.gather(1, torch.as_tensor(r.response_ids, dtype=torch.long).unsqueeze(1)).squeeze(1)
        np.testing.assert_allclose(r.logprobs, got.numpy(), atol=tol)
        np.testing.assert_allclose(r.student_topk_logprobs, torch.topk(want, 5, dim=-1).values.numpy(), atol=tol)
    # the prompt's own logprobs (a scoring forward inside the engine) are over real ids too
    item = client.generate_raw({"input_ids": PROMPTS[2], "sampling_params": {"max_new_tokens": 0},
                                "return_logprob": True, "logprob_start_len": 1, "top_logprobs_num": VOCAB})
    first, *tops = item["meta_info"]["input_top_logprobs"]  # SGLang reports None for the first prompt position
    assert first is None and all(e[1] < VOCAB for row in tops for e in row)
    np.testing.assert_allclose([sum(np.exp(e[0]) for e in row) for row in tops], 1.0, atol=1e-5)
    with pytest.raises(ServerError, match="outside the vocabulary"):
        client.generate([[3, VOCAB]], max_new_tokens=2)


def _fleet(student_url: str, teacher_url: str) -> Fleet:
    teacher = TeacherRouter({"default": TeacherClient(teacher_url)})
    return Fleet(Config(), [], [SGLangClient(student_url)], teacher, None)


def test_vocabulary_check_pairs_by_tokenizer_not_rows(ckpts, teacher_server):
    """Real servers' /model_info: a padded teacher pairs with an unpadded student of the same tokenizer; another
    tokenizer, or none, does not."""
    student = RolloutServer(RolloutEngine(tiny_model(1), str(ckpts["student"]))).start()
    others = [TeacherServer(tiny_model(2, vocab_size=VOCAB + 1), str(ckpts["other"])).start(),
              TeacherServer(tiny_model(1), str(ckpts["bare"])).start()]
    try:
        fleet = _fleet(student.url, teacher_server.url)
        fleet.check_vocabularies()
        fleet.shutdown()
        for other, path in zip(others, ("other", "bare"), strict=True):
            fleet = _fleet(student.url, other.url)
            with pytest.raises(VocabularyMismatch, match="tokenizers differ") as e:
                fleet.check_vocabularies()
            fleet.shutdown()
            assert str(ckpts["student"]) in str(e.value) and str(ckpts[path]) in str(e.value)
            assert "same tokenizer" in str(e.value)
    finally:
        for s in (student, *others):
            s.stop()


def test_vocabulary_check_rules(ckpts):
    """Without servers: rows short of the tokenizer, and stock SGLang's /model_info (no vocabulary fields: they are
    read from its model_path)."""
    student = {"model_path": str(ckpts["student"]), "vocab_size": VOCAB, "tokenizer_vocab_size": VOCAB,
               "tokenizer_fingerprint": "f"}
    with pytest.raises(VocabularyMismatch, match="embedding rows"):
        check_vocabulary_pair(student, {**student, "vocab_size": VOCAB - 1})
    sglang = {name: {"model_path": str(path), "is_generation": True} for name, path in ckpts.items()}
    check_vocabulary_pair(sglang["student"], sglang["teacher"])  # 19 ids; 19 and 83 rows from config.json
    with pytest.raises(VocabularyMismatch, match="tokenizers differ"):
        check_vocabulary_pair(sglang["student"], sglang["other"])
    with pytest.raises(VocabularyMismatch, match="no tokenizer.json"):
        check_vocabulary_pair(sglang["student"], sglang["bare"])


# ---- the learner: the padded model as the student it trains ---------------------------------------------------

def _padded_row_grads(trainer, learner: LearnerConfig) -> list[torch.Tensor]:
    """This rank's gradients of every embedding / output row past the tokenizer's ids (megatron: its vocabulary
    shard, whose rows past the checkpoint's are megatron's own TP padding)."""
    if learner.backend == "hf":
        module = trainer.model.module
        return [p.grad[VOCAB:] for p in {module.get_input_embeddings().weight, module.get_output_embeddings().weight}]
    params = dict(trainer.model.chunks[0].named_parameters())
    shards = [params[n] for n in ("embedding.word_embeddings.weight", "output_layer.weight") if n in params]
    start = trainer.model.where.tp_rank * shards[0].shape[0]  # the shard's first global id
    return [_grad(p)[max(0, VOCAB - start):] for p in shards]


def _grad(p: torch.nn.Parameter) -> torch.Tensor:
    """A parameter's gradient: megatron's DDP keeps it in `main_grad`."""
    return p.main_grad if getattr(p, "main_grad", None) is not None else p.grad


def _params(trainer) -> list[torch.nn.Parameter]:
    model = trainer.model
    return [p for c in model.chunks for p in c.parameters()] if hasattr(model, "chunks") \
        else list(model.module.parameters())


def check_padded_learner(padded: str, unpadded: str, learner: LearnerConfig) -> None:
    """One train_step of the padded student, on this rank (collective calls in the same order on every rank)."""
    from asyncopd.model.build import load_model

    hf = load_model(padded)
    before = hf.get_input_embeddings().weight.detach()
    trainer = make_trainer(learner, ESTIMATOR, padded, max_staleness=0)
    twin = make_trainer(learner_config(), ESTIMATOR, unpadded, max_staleness=0)  # no tokenizer: every row counts
    try:
        assert trainer.model.vocab_size == twin.model.vocab_size == VOCAB
        batch = make_batch()
        L = batch.input_ids.shape[1]

        # 1. log pi at every response token (what the ratios and decoupled PPO read) is a log-softmax over the real
        # rows. float32, derived: the learner's right-padded batch (megatron: GPTModel, TP partial sums) vs one HF
        # forward of each row, then a log-softmax over the VOCAB = 19 real logits (logprob_tol). A padded row in
        # the softmax puts almost all mass on itself: every logprob moves by about C (> 100).
        got = trainer.prox_logprobs(trainer.model.to_device(batch)).cpu()
        tol = logprob_tol(hf, L, vocab=VOCAB)
        for i in range(batch.input_ids.shape[0]):
            n, t = int(batch.attention_mask[i].sum()), int(batch.est.mask[i].sum())
            ids = batch.input_ids[i, :n].tolist()
            want = real_logprobs(hf, ids)[n - t - 1:n - 1].gather(1, torch.tensor(ids[n - t:])[:, None])[:, 0]
            torch.testing.assert_close(got[i, :t].double(), want, atol=tol, rtol=0)

        # 2. the loss is the unpadded twin's: padded rows cannot change it. The same math over the same 19 real
        # logits; those differ by the forwards' roundings only (the lm_head over 83 vs 19 rows; megatron: another
        # implementation), and forward KL is 2-Lipschitz in them, plus the estimator's own roundings.
        loss = trainer.train_step(make_batch()).metrics["loss"]
        expected = twin.train_step(make_batch()).metrics["loss"]
        assert loss == pytest.approx(expected, rel=0, abs=2 * logit_tol(hf, L) + FP32_ESTIMATOR)

        # 3. the loss gives the padded rows exactly no gradient (a sliced-off column's gradient is a written 0,
        # and no input id is padded), while the real rows learn
        for g in _padded_row_grads(trainer, learner):
            assert g.numel() and not g.any()
        assert any(_grad(p).any() for p in _params(trainer))

        # 4. the export keeps every HF row: the padded ones as loaded (a zero gradient and no weight decay make a
        # zero AdamW update, exactly), the real ones trained
        weights = {name: t for bucket in trainer.named_weights_for_rollout(1 << 20) for name, t in bucket}
        if not dist.is_initialized() or dist.get_rank() == 0:  # the rank that sends to the rollout fleet
            emb = weights["model.embed_tokens.weight"]
            assert emb.shape == before.shape == (ROWS, HIDDEN)
            assert torch.equal(emb[VOCAB:], before[VOCAB:]) and not torch.equal(emb[:VOCAB], before[:VOCAB])
    finally:
        trainer.close()
        twin.close()


def test_padded_student_in_the_learner_needs_the_slice(ckpts):
    """The premise of the learner tests: over every row, the padded student puts a padded id first everywhere."""
    from asyncopd.model.build import load_model

    with torch.no_grad():
        logits = load_model(ckpts["teacher"])(input_ids=make_batch().input_ids).logits
    assert (logits.argmax(-1) >= VOCAB).all()


def test_hf_learner_trains_over_the_tokenizer_ids_only(ckpts):
    check_padded_learner(str(ckpts["teacher"]), str(ckpts["unpadded"]), learner_config())


# vocab_divisible_by 8: 83 rows pad to 96 at TP=2, so both vocabulary shards hold padded HF rows (huge logits), the
# second nothing else
MEGATRON = dict(backend="megatron", vocab_divisible_by=8)


def test_megatron_learner_tp1_trains_over_the_tokenizer_ids_only(ckpts):
    pytest.importorskip("megatron.core")
    assert not dist.is_initialized()
    check_padded_learner(str(ckpts["teacher"]), str(ckpts["unpadded"]), learner_config(**MEGATRON, tp=1))


def _tp2_worker(rank: int, init_file: str, padded: str, unpadded: str) -> None:
    torch.set_num_threads(TEST_THREADS)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        check_padded_learner(padded, unpadded, learner_config(**MEGATRON, tp=2))
    finally:
        dist.destroy_process_group()


def test_megatron_learner_tp2_trains_over_the_tokenizer_ids_only(ckpts, tmp_path):
    pytest.importorskip("megatron.core")
    torch.multiprocessing.spawn(_tp2_worker, nprocs=2, args=(tempfile.mktemp(dir=tmp_path), str(ckpts["teacher"]),
                                                             str(ckpts["unpadded"])))
