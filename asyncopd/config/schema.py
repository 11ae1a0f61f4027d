"""The root config: the one home of every default (each component owns its dataclass)."""

from dataclasses import dataclass, field

from asyncopd.config.cluster import ClusterConfig
from asyncopd.config.run import RunConfig
from asyncopd.data.config import TaskConfig
from asyncopd.estimators.config import EstimatorConfig
from asyncopd.learner.config import LearnerConfig
from asyncopd.model.config import ModelConfig
from asyncopd.pipeline.config import PipelineConfig
from asyncopd.rollout.config import RolloutConfig
from asyncopd.teacher.config import TeacherConfig
from asyncopd.weights.config import WeightSyncConfig


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    weights: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
