"""Where a run finds its teacher, student, tokenizer and data: explicit paths, else the prepared artifacts."""

from dataclasses import dataclass
from pathlib import Path

from asyncopd.config.schema import Config, ModelConfig, TeacherConfig
from asyncopd.data.dataset import as_list

DATA_DIR = "data"  # under model.artifacts_dir: the built-in task as a dataset (train.jsonl, val.jsonl)
DEFAULT_TEACHER = "default"  # the name of the one `teacher` when `teachers` is empty


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


@dataclass(frozen=True)
class NamedTeacher:
    """One teacher service of a run: its name (what a sample's `data.teacher_key` column says), the config
    prefix its problems name, its settings and the checkpoint it serves."""

    name: str
    field: str  # "teacher" | "teachers.<name>"
    cfg: TeacherConfig
    path: str

    @property
    def path_field(self) -> str:
        """The config field its checkpoint comes from, for messages."""
        return f"{self.field}.model_path" if getattr(self.cfg, "model_path", "") else "model.teacher_path"


def teacher_services(cfg: Config) -> list[NamedTeacher]:
    """The run's teachers: `teachers` in config order, else the one `teacher` named DEFAULT_TEACHER; a
    checkpoint left empty is model.teacher_path, else the prepared teacher (one rule for every consumer)."""
    default = cfg.model.teacher_path or str(Path(cfg.model.artifacts_dir) / "teacher")
    if not cfg.teachers:
        return [NamedTeacher(DEFAULT_TEACHER, "teacher", cfg.teacher, default)]
    return [NamedTeacher(name, f"teachers.{name}", t, t.model_path or default) for name, t in cfg.teachers.items()]


def resolve_data_files(cfg: Config) -> tuple[list[str], list[str]]:
    """(train files, val files): `data.train_files` / `data.val_files`, else the prepared task's export. User
    train files without val files mean no evaluation."""
    train, val = as_list(cfg.data.train_files), as_list(cfg.data.val_files)
    if train:
        return train, val
    root = Path(cfg.model.artifacts_dir) / DATA_DIR
    return [str(root / "train.jsonl")], val or [str(root / "val.jsonl")]
