"""The serving side of a run: rollout engines and teacher replicas as Ray actors, and their clients."""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray

from asyncopd.config.schema import Config
from asyncopd.core.errors import ConfigError
from asyncopd.core.protocols import TeacherService
from asyncopd.core.types import Rollout
from asyncopd.model.paths import ModelPaths
from asyncopd.net.server import vocabulary_card
from asyncopd.rollout.backends import ROLLOUT_BACKENDS
from asyncopd.rollout.client import SGLangClient
from asyncopd.teacher.backends import TEACHER_BACKENDS


class VocabularyMismatch(ConfigError):
    """Teacher and student checkpoints with different tokenizers (a user error: exit 2)."""


_VOCAB_KEYS = ("vocab_size", "tokenizer_vocab_size", "tokenizer_fingerprint")
_FIX = ("On-policy distillation needs one shared tokenizer: set model.teacher_path/model.student_path to a pair "
        "built with the same tokenizer.")


def vocabulary_of(info: dict) -> dict:
    """A server's /model_info with its vocabulary fields; stock SGLang's has none, so they are read from its
    model_path on this machine (where resolve_model_paths found the checkpoint)."""
    if all(k in info for k in _VOCAB_KEYS):
        return info
    path = info.get("model_path") or ""
    config = Path(path) / "config.json"
    rows = json.loads(config.read_text()).get("vocab_size") if path and config.is_file() else None
    card = vocabulary_card(path, int(rows or 0))
    if not rows:  # no row count to check the tokenizer against (SGLang checks it when it loads the model)
        card["vocab_size"] = card["tokenizer_vocab_size"]
    return {**info, **card}


def check_vocabulary_pair(student: dict, teacher: dict) -> None:
    """Teacher and student /model_info may pair when their tokenizers are one (same non-empty fingerprint, same
    id count) and each model has an embedding row for every id; their rows may differ (padding), because the
    servers score and sample the tokenizer's ids only. Raises VocabularyMismatch naming both paths."""
    s, t = vocabulary_of(student), vocabulary_of(teacher)

    def describe(role: str, c: dict) -> str:
        fp = c["tokenizer_fingerprint"] or "none: no tokenizer.json"
        return f"{role} {c.get('model_path')!r} (fingerprint {fp}, {c['tokenizer_vocab_size']} ids)"

    if (not s["tokenizer_fingerprint"] or s["tokenizer_fingerprint"] != t["tokenizer_fingerprint"]
            or s["tokenizer_vocab_size"] != t["tokenizer_vocab_size"]):
        raise VocabularyMismatch(f"teacher and student tokenizers differ: {describe('student', s)} vs "
                                 f"{describe('teacher', t)}. {_FIX}")
    for role, c in (("student", s), ("teacher", t)):
        if c["tokenizer_vocab_size"] > c["vocab_size"]:
            raise VocabularyMismatch(
                f"{describe(role, c)} has {c['vocab_size']} embedding rows, fewer than its tokenizer's ids, so some "
                f"tokens have no embedding (student {s.get('model_path')!r}, teacher {t.get('model_path')!r}). "
                f"Point model.{role}_path at a checkpoint whose embedding covers its tokenizer.")


class Fleet:
    def __init__(self, cfg: Config, actors: list, engines: list[SGLangClient], teacher: TeacherService,
                 teacher_accuracy: float | None):
        self.cfg = cfg
        self.actors = actors
        self.engines = engines
        self.teacher = teacher
        self.teacher_accuracy = teacher_accuracy
        self.pool = ThreadPoolExecutor(max_workers=len(engines), thread_name_prefix="rollout")

    @classmethod
    def launch(cls, cfg: Config, paths: ModelPaths) -> "Fleet":
        rollout, teacher_backend = ROLLOUT_BACKENDS[cfg.rollout.backend], TEACHER_BACKENDS[cfg.teacher.backend]
        engine_host = rollout.host().options(num_cpus=0, num_gpus=cfg.rollout.gpus_per_engine)
        teacher_host = teacher_backend.host().options(num_cpus=0, num_gpus=cfg.teacher.gpus_per_replica)
        engine_actors = [engine_host.remote(paths.student, cfg.rollout) for _ in range(cfg.rollout.num_engines)]
        teacher_actors = [teacher_host.remote(paths.teacher, cfg.teacher) for _ in range(cfg.teacher.replicas)]
        engine_urls = ray.get([a.start.remote() for a in engine_actors])
        teacher_urls = ray.get([a.start.remote() for a in teacher_actors])
        engines = [SGLangClient(u, api_key=cfg.rollout.api_key, timeout_s=cfg.rollout.request_timeout_s)
                   for u in engine_urls]
        teacher = teacher_backend.client(teacher_urls, api_key=cfg.teacher.api_key,
                                         timeout_s=cfg.teacher.request_timeout_s, wire_dtype=cfg.teacher.wire_dtype)
        prepared = Path(cfg.model.artifacts_dir) / "prepare.json"
        accuracy = None
        if not cfg.model.teacher_path and prepared.exists():
            accuracy = json.loads(prepared.read_text())["teacher"]["accuracy"]
        return cls(cfg, engine_actors + teacher_actors, engines, teacher, accuracy)

    def check_vocabularies(self) -> None:
        """Refuse to distil across tokenizers: teacher scores index the student's vocabulary."""
        check_vocabulary_pair(self.engines[0].model_info(), self.teacher.model_info()[0])  # replicas agree

    def generate(self, prompts: list[list[int]], *, temperature: float | None = None, mc_samples: int = 0,
                 student_top_k: int = 0, seed: int | None = None) -> list[Rollout]:
        """Split the batch evenly across engines and generate the shards concurrently (engine i samples with
        ``seed + i`` when a seed is given)."""
        r = self.cfg.rollout
        n = len(self.engines)
        shards = [prompts[i::n] for i in range(n)]
        futures = [
            self.pool.submit(engine.generate, shard, max_new_tokens=r.max_new_tokens,
                             temperature=r.temperature if temperature is None else temperature,
                             top_p=r.top_p, mc_samples=mc_samples, student_top_k=student_top_k,
                             seed=None if seed is None else seed + i)
            for i, (engine, shard) in enumerate(zip(self.engines, shards, strict=True)) if shard
        ]
        results = [f.result() for f in futures]
        out: list[Rollout] = [None] * len(prompts)  # type: ignore[list-item]
        for i, shard in enumerate(results):
            out[i::n] = shard
        return out

    def shutdown(self) -> None:
        """Servers stop first (engines leave the weight group while its rank 0 still exists), then die."""
        self.pool.shutdown(wait=False)
        try:
            ray.get([a.stop.remote() for a in self.actors], timeout=30)
        finally:
            for a in self.actors:
                ray.kill(a)
