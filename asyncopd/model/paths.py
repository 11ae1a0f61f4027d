"""Where a run finds its teacher, student and tokenizer: explicit paths, else the prepared artifacts."""

from dataclasses import dataclass
from pathlib import Path

from asyncopd.config.schema import ModelConfig


@dataclass(frozen=True)
class ModelPaths:
    teacher: str
    student: str
    tokenizer: str


def resolve_model_paths(cfg: ModelConfig, must_exist: bool = True) -> ModelPaths:
    root = Path(cfg.artifacts_dir)
    paths = ModelPaths(
        teacher=cfg.teacher_path or str(root / "teacher"),
        student=cfg.student_path or str(root / "student"),
        tokenizer=cfg.tokenizer_path or str(root / "student"),
    )
    if must_exist:
        for field, path in (("teacher_path", paths.teacher), ("student_path", paths.student)):
            if not (Path(path) / "config.json").exists():
                raise FileNotFoundError(
                    f"model.{field}={path!r} holds no Hugging Face checkpoint (config.json missing): "
                    "run `asyncopd prepare` to build the embedded models, or point model."
                    f"{field} at a checkpoint directory"
                )
    return paths
