"""Every role's Ray placement group (cluster.placement_groups), reserved in one fixed order before any actor starts.

The learner launches in a thread beside the fleet (asyncopd.pipeline.run). Were each launcher to reserve its own
group, that race would decide where the groups land, and on an allocation with no GPU to spare some orders do not
fit: SPREAD engines taking a GPU on every node leave no node room for a learner's TP group. The largest bundles go
first instead: the teachers (largest replicas first), then the learner (a TP group per bundle), then the engines.
"""

from dataclasses import dataclass

from asyncopd.config.schema import Config
from asyncopd.learner.group import learner_placement
from asyncopd.pipeline.fleet import rollout_placement, teacher_placements


@dataclass(frozen=True)
class Placements:
    """Each actor's Ray `.options()` (empty without placement groups: Ray's default)."""

    teachers: dict[str, list[dict]]  # teacher service -> by replica
    learner: list[dict]  # by rank
    rollout: list[dict]  # by engine


def reserve(cfg: Config) -> Placements:
    """Reserve every role's group, in the module's order; raises ConfigError naming a group that does not fit."""
    teachers = teacher_placements(cfg)  # the order matters: see the module's docstring
    learner = learner_placement(cfg)
    rollout = rollout_placement(cfg)
    return Placements(teachers, learner, rollout)
