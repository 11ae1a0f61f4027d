"""Every role's Ray placement group (cluster.placement_groups), reserved in one fixed order before any actor starts.

The learner launches in a thread beside the fleet (asyncopd.pipeline.run). Were each launcher to reserve its own
group, that race would decide where the groups land, and on an allocation with no GPU to spare some orders do not
fit: SPREAD engines taking a GPU on every node leave no node room for a learner's TP group. The largest bundles go
first instead (GPUs per bundle: a teacher replica, a learner TP group, an engine), ties in that role order.
"""

from collections.abc import Callable
from dataclasses import dataclass

from asyncopd.config.schema import Config
from asyncopd.learner.group import learner_placement
from asyncopd.model.paths import teacher_services
from asyncopd.pipeline.fleet import rollout_placement, teacher_placement


@dataclass(frozen=True)
class Placements:
    """Each actor's Ray `.options()` (empty without placement groups: Ray's default)."""

    teachers: dict[str, list[dict]]  # teacher service -> by replica
    learner: list[dict]  # by rank
    rollout: list[dict]  # by engine

    def release(self) -> None:
        """Remove the groups (their resources go back to the cluster; a run on a shared Ray must not keep them)."""
        release([*self.teachers.values(), self.learner, self.rollout])


def release(placed: list[list[dict]]) -> None:
    import ray
    from ray.util.placement_group import remove_placement_group

    groups = {o["scheduling_strategy"].placement_group.id: o["scheduling_strategy"].placement_group
              for options in placed for o in options if "scheduling_strategy" in o}
    if groups and ray.is_initialized():
        for group in groups.values():
            remove_placement_group(group)


def reserve(cfg: Config) -> Placements:
    """Reserve every role's group, largest bundles first; raises ConfigError naming a group that does not fit
    (and gives back the ones already reserved)."""
    lr = cfg.learner
    # (GPUs per bundle, name, reserve): sorted() is stable, so ties keep this role order
    wanted: list[tuple[float, tuple[str, str], Callable[[], list[dict]]]] = [
        *((t.cfg.gpus_per_replica, ("teacher", t.name), lambda t=t: teacher_placement(cfg, t))
          for t in teacher_services(cfg)),
        (lr.gpus_per_rank * lr.tp, ("learner", ""), lambda: learner_placement(cfg)),
        (cfg.rollout.gpus_per_engine, ("rollout", ""), lambda: rollout_placement(cfg))]
    done: dict[tuple[str, str], list[dict]] = {}
    try:
        for _, key, place in sorted(wanted, key=lambda w: -w[0]):
            done[key] = place()
    except BaseException:
        release(list(done.values()))
        raise
    return Placements({t.name: done["teacher", t.name] for t in teacher_services(cfg)}, done["learner", ""],
                      done["rollout", ""])
