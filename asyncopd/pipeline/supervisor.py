"""Keeping the serving tier whole during a run: a lost engine or teacher replica is restarted, its work goes
elsewhere meanwhile, and a restarted engine gets the current weights before it takes traffic again.

Who notices a loss:
- a request that gets no answer: the rollout dispatcher (asyncopd.rollout.dispatch) sends it to another engine and
  the teacher client (asyncopd.teacher.client) to another replica, and each marks the server down and calls `_lost`;
- an engine answering with weights older than it was sent restarted under its actor's watchdog (EngineRestarted):
  the same path;
- a weight sync that fails (an engine died mid-update): the engines that no longer answer are marked down, and the
  sync is retried over the others;
- a request through sglang-router (rollout.router) that it failed, or answered with weights older than every
  engine behind it was sent: the router does not say which engine served it, so each engine it routes to is probed
  as after a failed sync, before the request goes through it again.

The router re-admits any worker that answers /health, and a restarted engine does with its checkpoint's weights:
a lost engine leaves the router's rotation as soon as it is noticed, before its restart, and is added back (at its
possibly new URL) only when it is admitted with the current weights. The routed dispatcher's floor
(`min_version[0]`) is the version every engine in the router was last sent.

Restart (`actor.ensure_serving(port)`): the embedded servers run inside their Ray actor, so SIGKILL of the server
process is the actor's death; Ray restarts the actor (`supervision.max_restarts`) and the fresh actor serves again
on its predecessor's port when free (else a new one, and the client is retargeted). A server that died under a live
actor (SGLang's process) was restarted by the actor's watchdog, or is now.

Weights: torch.distributed groups cannot add members, so a restarted (or late) engine is admitted by re-forming the
group over every live engine (learner and survivors leave the old group; all join a new one on a new port) and
broadcasting the learner's weights, labelled with their version, to all of them. The engine takes traffic only
after that. `lock` makes the label exact: the loop holds it over each train_step and its sync, so whenever this
module holds it the learner's weights are exactly `version`. The simpler alternatives cost more: a group per engine
sends every bucket once per engine, and restarting from the last checkpoint needs one per step.
"""

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ray

from asyncopd.config.schema import Config
from asyncopd.core.protocols import LearnerHandle
from asyncopd.net.actor import url_port
from asyncopd.net.client import Backoff, ServerError
from asyncopd.pipeline.fleet import Fleet
from asyncopd.rollout.backends import weight_sync_config
from asyncopd.rollout.client import parse_version
from asyncopd.weights.sync import SyncStats, WeightSync

log = logging.getLogger(__name__)
HEALTH_TIMEOUT_S = 5.0  # a weight sync failed: how long each engine has to answer to count as alive
SYNC_TRIES = 3  # a weight sync over the live engines, re-formed after each failure


@dataclass
class Fault:
    """One server lost during the run, and what it cost."""

    role: str  # "rollout" | "teacher"
    index: int  # the engine's index, or the replica's within its teacher
    detected_at_step: int  # the learner's version (optimizer steps taken) when it was noticed
    cause: str
    teacher: str = ""  # the teacher it serves (role "teacher")
    time_lost_s: float | None = None  # noticed -> serving again (an engine: with the current weights); None: not back
    url: str = ""  # where it serves again

    def __post_init__(self) -> None:
        self._t0 = time.monotonic()  # not a field: not reported

    def recovered(self, url: str) -> None:
        self.url, self.time_lost_s = url, time.monotonic() - self._t0


class Supervisor:
    """The run's weight sync (`init_group`, `sync`, `close`, as WeightSync's) over the engines that are alive, and the
    restart of every server that is lost (module docstring). `faults` lists them; `error` is set once one cannot be
    brought back, and the next `sync` raises it."""

    def __init__(self, cfg: Config, fleet: Fleet, learner: LearnerHandle):
        self.cfg, self.fleet, self.learner = cfg, fleet, learner
        self.lock = threading.RLock()
        self.version = 0
        self.faults: list[Fault] = []
        self.error: BaseException | None = None
        self._sync: WeightSync | None = None
        self._members: list[int] = []  # engines in the current weight group
        self._stale = True  # a member was lost since it formed (or it never did): re-form before the next sync
        self._down: set[int] = set()  # lost, not yet restarted: in no group, no traffic
        self._pending: dict[int, Fault] = {}  # restarted, waiting for the current weights
        self._lost_count: dict[tuple[str, str, int], int] = {}
        self._closed = threading.Event()
        self._looking = threading.Lock()  # one look behind the router at a time
        self._pool = ThreadPoolExecutor(max_workers=max(len(fleet.engines), 1), thread_name_prefix="supervisor")
        fleet.direct.pool.on_lost = lambda i, e: self._lost("rollout", "", i, e)
        if fleet.routed is not None:
            fleet.routed.on_fault = self._look_behind_router
        for name, client in fleet.teacher.clients.items():
            client.on_lost = lambda k, e, name=name: self._lost("teacher", name, k, e)

    @property
    def engines(self) -> list:
        return self.fleet.engines

    # ---- the weight sync ---------------------------------------------------------------------------
    def init_group(self) -> None:
        with self.lock:
            self._reform([i for i in range(len(self.engines)) if i not in self._down])

    def sync(self, version: int) -> SyncStats:
        """Push the learner's weights as `version` to every live engine (and to restarted ones, which then take
        traffic again), re-forming the group first if its members changed and after a failure."""
        with self.lock:
            if self.error is not None:
                raise self.error
            for attempt in range(SYNC_TRIES):
                live = [i for i in range(len(self.engines)) if i not in self._down]
                try:
                    if self._stale or live != self._members:
                        self._reform(live)
                    stats = self._sync.sync(version) if self._sync is not None else SyncStats(version, 0, 0, 0, 0, 0)
                    break
                except Exception as e:
                    if attempt == SYNC_TRIES - 1 or self._closed.is_set():
                        raise
                    log.warning("weight sync to version %d failed (%s); re-forming the group over the live engines",
                                version, e)
                    self._stale = True  # whatever happened, the group is not to be trusted
                    self._find_lost()
            self.version = version
            for i in self._members:
                self.fleet.direct.min_version[i] = version
            if self.fleet.routed is not None:  # the engines in the router are members: each holds `version`
                self.fleet.routed.min_version[0] = version
            for i in [i for i in self._pending if i in self._members]:
                fault = self._pending.pop(i)
                if self.fleet.router is not None:
                    try:
                        self.fleet.router.add_worker(self.engines[i].base_url)
                    except (ServerError, RuntimeError) as e:
                        self._give_up(fault, e)
                        continue
                fault.recovered(self.engines[i].base_url)
                self.fleet.direct.pool.mark_up(i)
                log.warning("rollout engine %d serves again at %s with weights version %d (%.1f s lost)", i,
                            fault.url, version, fault.time_lost_s)
            return stats

    def _reform(self, members: list[int]) -> None:
        """A new weight group over engines `members` (every member and the learner leave the old one first)."""
        if self._sync is not None:
            self._sync.close()
            self._sync = None
        self._members, self._stale = [], True

        def leave(i: int) -> None:
            try:
                self.engines[i].destroy_weights_update_group(self.cfg.weights.group_name)
            except ServerError:
                pass  # not in a group (fresh, or the first formation)

        list(self._pool.map(leave, members))
        if members:
            sync = WeightSync(weight_sync_config(self.cfg), self.learner, [self.engines[i] for i in members],
                              engine_tp=self.cfg.rollout.tp)
            sync.init_group()
            self._sync = sync
        self._members, self._stale = members, False

    def _probe(self, i: int) -> str:
        """Why engine i is lost: it does not answer, or serves weights older than it was sent (restarted under its
        watchdog, out of the group); "" if neither."""
        try:
            version = parse_version(self.engines[i].get_json("/model_info", timeout_s=HEALTH_TIMEOUT_S)
                                    .get("weight_version"))
        except ServerError as e:
            return f"no answer ({e})"
        return f"serves weights version {version}, older than {self.version}" if version < self.version else ""

    def _find_lost(self) -> None:
        """After a failed sync, the engines to restart (`_probe`); a restarted one waiting for its weights is old by
        design, and lost only if it does not answer."""
        live = [i for i in range(len(self.engines)) if i not in self._down]
        for i, cause in zip(live, self._pool.map(self._probe, live), strict=True):
            if not cause or (i in self._pending and not cause.startswith("no answer")):
                continue
            cause = f"{cause} after a failed weight sync"
            if self._pending.pop(i, None) is not None:  # restarted, lost again before it was admitted
                self._lost("rollout", "", i, ServerError(cause))
            else:
                self.fleet.direct.pool.mark_down(i, ServerError(cause))  # -> _lost, unless already being restarted

    def _look_behind_router(self, error: BaseException) -> None:
        """A request through the router was lost, or answered with old weights, by an engine the router does not
        name (module docstring): each engine in the router (admitted, not down) that `_probe` finds lost is marked
        down, which takes it out of the router before the request is sent again. The requests one dead engine fails
        together wait for one look; with none left in the router (it answers 503), they wait for one to be admitted,
        as direct requests wait for an engine."""
        with self._looking:
            if self._closed.is_set():
                return
            routed = [i for i in range(len(self.engines)) if i not in self._down and i not in self._pending]
            for i, cause in zip(routed, self._pool.map(self._probe, routed), strict=True):
                if cause:
                    self.fleet.direct.pool.mark_down(i, ServerError(f"{cause}; seen through the router: {error}"))
        self.fleet.direct.pool.wait_any_up()

    # ---- losses and restarts -----------------------------------------------------------------------
    def _record(self, role: str, teacher: str, index: int, cause: str) -> Fault:
        fault = Fault(role, index, self.version, cause, teacher)
        self.faults.append(fault)
        log.warning("%s %s%d lost at step %d: %s", role, f"{teacher} " if teacher else "", index, self.version, cause)
        return fault

    def _lost(self, role: str, teacher: str, index: int, error: BaseException) -> None:
        """A server was lost (its client marked it down): record it and restart it in the background."""
        if self._closed.is_set():
            return
        fault = self._record(role, teacher, index, f"{type(error).__name__}: {error}")
        key = (role, teacher, index)
        self._lost_count[key] = self._lost_count.get(key, 0) + 1
        if role == "rollout":
            # not under `lock`: a dispatcher thread must not wait out a sync to move on
            self._down.add(index)
            self._stale = True  # its old incarnation is a member: a broadcast would fail on it
            self._leave_router(index)
        threading.Thread(target=self._recover, args=(fault,), name=f"recover:{role}{index}", daemon=True).start()

    def _leave_router(self, i: int) -> None:
        """Engine i out of the router's rotation before it is restarted (module docstring). A router that cannot be
        told leaves the fence: its floor refuses the restarted engine's answers."""
        if self.fleet.router is None:
            return
        try:
            self.fleet.router.remove_worker(self.engines[i].base_url)
        except (ServerError, RuntimeError) as e:
            log.error("sglang-router did not take rollout engine %d out of rotation: %s", i, e)

    def _recover(self, fault: Fault) -> None:
        role, name, i = fault.role, fault.teacher, fault.index
        actor = self.fleet.engine_actors[i] if role == "rollout" else self.fleet.teacher_actors[name][i]
        client = self.engines[i] if role == "rollout" else self.fleet.teacher.clients[name].replicas[i]
        try:
            if self._lost_count[(role, name, i)] > self.cfg.supervision.max_restarts:
                raise RuntimeError(f"lost {self._lost_count[(role, name, i)]} times, more than "
                                   f"supervision.max_restarts={self.cfg.supervision.max_restarts}")
            url = self._restart(actor, url_port(client.base_url))
        except Exception as e:
            if not self._closed.is_set():
                self._give_up(fault, e)
            return
        if url != client.base_url:
            client.retarget(url)
        if role == "teacher":
            fault.recovered(url)
            self.fleet.teacher.clients[name].mark_up(i)
            log.warning("teacher %s replica %d serves again at %s (%.1f s lost)", name, i, url, fault.time_lost_s)
            return
        with self.lock:  # the current weights, then traffic (sync admits pending engines)
            self._pending[i] = fault  # before it leaves _down: a look behind the router skips it throughout
            self._down.discard(i)
            if not self._closed.is_set():
                try:
                    self.sync(self.version)
                except Exception as e:
                    self._give_up(fault, e)

    def _restart(self, actor, port: int) -> str:
        """The URL the actor serves at once its server is back: Ray restarts a dead actor, and calls made while it
        restarts fail (ActorUnavailableError) or wait; bounded retries, the model load within restart_timeout_s."""
        sup = self.cfg.supervision
        retry = Backoff(attempts=8, base_s=0.5, max_s=5.0, deadline_s=sup.restart_timeout_s)
        return retry.call(lambda _: ray.get(actor.ensure_serving.remote(port), timeout=sup.restart_timeout_s),
                          retry_if=lambda e: isinstance(e, ray.exceptions.RayActorError))

    def _give_up(self, fault: Fault, error: BaseException) -> None:
        """A lost server cannot be brought back: the run stops with this error (at the next sync, and any rollout
        waiting for an engine)."""
        where = f"teacher {fault.teacher!r} replica" if fault.role == "teacher" else "rollout engine"
        self.error = RuntimeError(f"{where} {fault.index} was lost at step {fault.detected_at_step} ({fault.cause}) "
                                  f"and could not be restarted: {type(error).__name__}: {error}")
        log.error("%s", self.error)
        if fault.role == "rollout":
            self.fleet.direct.pool.fail(self.error)

    def close(self) -> None:
        self._closed.set()
        if self._sync is not None:
            self._sync.close()
        self._pool.shutdown(wait=False)
