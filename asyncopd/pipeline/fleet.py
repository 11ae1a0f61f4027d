"""The serving side of a run: rollout engines and teacher replicas as Ray actors, and their clients."""

import json
from pathlib import Path

import ray

from asyncopd.config.ray_cluster import placement
from asyncopd.config.schema import Config
from asyncopd.core.errors import ConfigError
from asyncopd.core.types import Rollout
from asyncopd.model.paths import ModelPaths, NamedTeacher, teacher_services
from asyncopd.net.server import vocabulary_card
from asyncopd.rollout.backends import ROLLOUT_BACKENDS
from asyncopd.rollout.client import SGLangClient
from asyncopd.rollout.dispatch import Dispatcher
from asyncopd.rollout.sglang_router import ROUTERS, SGLangRouter, lost_behind
from asyncopd.teacher.backends import TEACHER_BACKENDS
from asyncopd.teacher.router import TeacherRouter


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


def rollout_placement(cfg: Config) -> list[dict]:
    """Each engine's Ray options (asyncopd.config.ray_cluster.placement)."""
    r = cfg.rollout
    return placement(cfg.cluster, "rollout", r.num_engines, r.gpus_per_engine,
                     sized_by="rollout.num_engines, rollout.gpus_per_engine")


def teacher_placement(cfg: Config, service: NamedTeacher) -> list[dict]:
    """A teacher service's replicas' Ray options, a group per service."""
    return placement(cfg.cluster, "teacher", service.cfg.replicas, service.cfg.gpus_per_replica,
                     sized_by=f"{service.field}.replicas, {service.field}.gpus_per_replica")


class Fleet:
    def __init__(self, cfg: Config, actors: list, engines: list[SGLangClient], teacher: TeacherRouter,
                 teacher_accuracy: float | None):
        self.cfg = cfg
        self.actors = actors
        self.engines = engines
        self.teacher = teacher
        self.teacher_accuracy = teacher_accuracy
        r = cfg.rollout
        self.direct = Dispatcher(engines, r.max_inflight_per_engine, r.samples_per_request, r.max_batch_size,
                                 max_redispatch=cfg.supervision.max_redispatch)
        # the Ray actors behind engines[i] and teacher.clients[name].replicas[k] (launch): what a supervisor restarts
        self.engine_actors: list = []
        self.teacher_actors: dict[str, list] = {}
        self.router: SGLangRouter | None = None  # rollout.router=sglang_router (start_router)
        self.routed: Dispatcher | None = None

    @classmethod
    def launch(cls, cfg: Config, paths: ModelPaths, rollout_placed: list[dict] | None = None,
               teachers_placed: dict[str, list[dict]] | None = None) -> "Fleet":
        """Start the engines and teacher replicas and connect to them. `rollout_placed`, `teachers_placed`: their
        Ray options, reserved beforehand with the learner's (asyncopd.pipeline.placements); None reserves them now."""
        if teachers_placed is None:
            teachers_placed = {t.name: teacher_placement(cfg, t) for t in teacher_services(cfg)}
        rollout_placed = rollout_placement(cfg) if rollout_placed is None else rollout_placed
        rollout, sup = ROLLOUT_BACKENDS[cfg.rollout.backend], cfg.supervision
        # max_restarts: Ray restarts an actor whose process died (the embedded servers run inside it)
        engine_actors = [rollout.host().options(num_cpus=0, num_gpus=cfg.rollout.gpus_per_engine,
                                                max_restarts=sup.max_restarts, **placed).remote(
                             paths.student, cfg.rollout, sup)
                         for placed in rollout_placed]
        services = teacher_services(cfg)
        teacher_actors = {t.name: [TEACHER_BACKENDS[t.cfg.backend].host().options(
            num_cpus=0, num_gpus=t.cfg.gpus_per_replica, max_restarts=sup.max_restarts, **placed).remote(
                t.path, t.cfg, sup)
            for placed in teachers_placed[t.name]]
            for t in services}
        started = {name: [a.start.remote() for a in actors] for name, actors in teacher_actors.items()}  # all at once
        engine_urls = ray.get([a.start.remote() for a in engine_actors])
        teacher_urls = {name: ray.get(refs) for name, refs in started.items()}
        engines = [SGLangClient(u, api_key=cfg.rollout.api_key, timeout_s=cfg.rollout.request_timeout_s)
                   for u in engine_urls]
        # vocab_size: the ids a teacher's distributions span (its tokenizer's), for the uniform-scores check
        teacher = TeacherRouter({t.name: TEACHER_BACKENDS[t.cfg.backend].client(
            teacher_urls[t.name], api_key=t.cfg.api_key, timeout_s=t.cfg.request_timeout_s,
            wire_dtype=t.cfg.wire_dtype, check_scores=t.cfg.check_scores, retry_attempts=sup.retry_attempts,
            vocab_size=vocabulary_of({"model_path": t.path})["tokenizer_vocab_size"] or None) for t in services})
        prepared = Path(cfg.model.artifacts_dir) / "prepare.json"
        accuracy = None
        if not cfg.model.teacher_path and not cfg.teachers and prepared.exists():  # measured of the prepared one
            accuracy = json.loads(prepared.read_text())["teacher"]["accuracy"]
        fleet = cls(cfg, engine_actors + [a for actors in teacher_actors.values() for a in actors], engines, teacher,
                    accuracy)
        fleet.engine_actors, fleet.teacher_actors = engine_actors, teacher_actors
        try:
            fleet.start_router()
        except BaseException:
            fleet.shutdown()
            raise
        return fleet

    def node_ids(self) -> dict[str, list[str]]:
        """The Ray node of every engine and teacher replica, by role ("teacher/<name>" with several teachers)."""
        out = {"rollout": ray.get([a.node_id.remote() for a in self.engine_actors])}
        for name, actors in self.teacher_actors.items():
            out["teacher" if len(self.teacher_actors) == 1 else f"teacher/{name}"] = \
                ray.get([a.node_id.remote() for a in actors])
        return out

    def start_router(self) -> None:
        """rollout.router=sglang_router: the router over the engines, on 127.0.0.1; /generate goes through it from
        now on (at most max_inflight_per_engine x engines in flight), weight sync, pause and abort still go to each
        engine (the router forwards none of them)."""
        r = self.cfg.rollout
        if r.router == "none":
            return
        if r.router not in ROUTERS:
            raise ConfigError(f"rollout.router={r.router!r} is unknown: use one of {list(ROUTERS)}")
        self.router = SGLangRouter([e.base_url for e in self.engines], api_key=r.api_key,
                                   request_timeout_s=r.request_timeout_s, extra_args=r.router_args)
        url = self.router.start()
        # a request an engine behind the router lost goes through it again (the supervisor takes that engine out)
        self.routed = Dispatcher([SGLangClient(url, api_key=r.api_key, timeout_s=r.request_timeout_s)],
                                 r.max_inflight_per_engine * len(self.engines), r.samples_per_request,
                                 r.max_batch_size, one_seed_per_request=True,
                                 max_redispatch=self.cfg.supervision.max_redispatch, lost=lost_behind)

    def request_counts(self) -> dict:
        """/generate requests each engine served directly, and those sent through the router (which spread them)."""
        return {"per_engine": list(self.direct.pool.served),
                "via_router": sum(self.routed.pool.served) if self.routed is not None else 0}

    def redispatched(self) -> int:
        """Rollout requests sent again after an engine serving them was lost, directly or behind the router."""
        return sum(d.pool.redispatched for d in (self.direct, self.routed) if d is not None)

    def check_vocabularies(self) -> None:
        """Refuse to distil across tokenizers: every teacher's scores index the student's vocabulary."""
        student = self.engines[0].model_info()
        for client in self.teacher.clients.values():
            check_vocabulary_pair(student, client.model_info()[0])  # a teacher's replicas agree

    def generate(self, prompts: list[list[int]], *, temperature: float | None = None, mc_samples: int = 0,
                 student_top_k: int = 0, seed: int | None = None) -> list[Rollout]:
        """Rollouts in prompt order, each request sent to whichever engine has a free slot (asyncopd.rollout.dispatch)
        or through sglang-router; sample i draws with `sample_seed(seed, i)` when a seed is given, so its tokens do
        not depend on the engine that drew them. Requests carrying mc_samples go to the engines directly: the
        router drops our extension (asyncopd.rollout.sglang_router)."""
        r = self.cfg.rollout
        via = self.routed if self.routed is not None and not mc_samples else self.direct
        return via.generate(prompts, seed=seed, max_new_tokens=r.max_new_tokens,
                            temperature=r.temperature if temperature is None else temperature, top_p=r.top_p,
                            mc_samples=mc_samples, student_top_k=student_top_k)

    def shutdown(self) -> None:
        """The router stops, then the servers (engines leave the weight group while its rank 0 still exists), then
        they die."""
        for dispatcher in (self.direct, self.routed):
            if dispatcher is not None:
                dispatcher.shutdown()
        if self.router is not None:
            self.router.stop()
        if not self.actors:  # servers started elsewhere (`asyncopd serve`): nothing of Ray's to stop
            return
        try:
            ray.get([a.stop.remote() for a in self.actors], timeout=30)
        except ray.exceptions.RayError:  # a server lost or still restarting (a fault late in the run): killed below
            pass
        finally:
            for a in self.actors:
                ray.kill(a)
