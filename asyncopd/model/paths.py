"""Where a run finds its teacher, student, tokenizer and data: explicit paths, else the prepared artifacts."""

from dataclasses import dataclass
from pathlib import Path

from asyncopd.config.schema import Config, ModelConfig
from asyncopd.data.dataset import as_list

DATA_DIR = "data"  # under model.artifacts_dir: the built-in task as a dataset (train.jsonl, val.jsonl)


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


def resolve_data_files(cfg: Config) -> tuple[list[str], list[str]]:
    """(train files, val files): `data.train_files` / `data.val_files`, else the prepared task's export. User
    train files without val files mean no evaluation."""
    train, val = as_list(cfg.data.train_files), as_list(cfg.data.val_files)
    if train:
        return train, val
    root = Path(cfg.model.artifacts_dir) / DATA_DIR
    return [str(root / "train.jsonl")], val or [str(root / "val.jsonl")]
