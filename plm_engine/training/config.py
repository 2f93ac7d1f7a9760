"""TrainConfig: every knob of a training run, loaded from TOML or YAML and overridden by command-line flags.

A config file is flat (one table of keys) or nests keys under [train]; `model_overrides` is a table of
ModelConfig fields applied on top of a preset (e.g. {n_layers = 4, hidden_size = 256}).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10: the same parser as the tomli package
    import tomli as tomllib

OBJECTIVES = ("clm", "mlm", "classify", "seq2seq")
SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("fp32", "bf16", "fp16")
DISTRIBUTED = ("auto", "none", "ddp", "fsdp")
KEEP_BEST = ("", "accuracy", "macro_f1", "loss")


@dataclass
class TrainConfig:
    # What to train.
    objective: str = "clm"
    model: str | None = None  # a ModelConfig preset ("gpt2-tiny", "bert-tiny", "bart-tiny") to start from scratch
    init: str | None = None  # or a checkpoint: "smollm2-135m", "minilm-l6", a folder / .gguf path
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields on top of the preset
    # Data.
    data: list[str] = field(default_factory=list)  # text files / folders, or "shakespeare"
    eval_data: list[str] = field(default_factory=list)  # held-out files; else a tail split of `data`
    eval_fraction: float = 0.05
    dataset: str = "text"  # "text" (clm/mlm), "jsonl" ({"text", "label"} rows), "shakespeare-genre"
    tokenizer: str = "model"  # "model" (the init checkpoint's), "bpe" (train one on `data`), a path
    bpe_vocab_size: int = 4096
    cache_dir: str | None = None  # tokenization cache; default <out_dir>/cache
    seq_len: int = 128
    mlm_probability: float = 0.15
    # seq2seq: BART's denoising (training/data.py: denoising_source). Spans of about mean_span_length
    # tokens covering noise_density of each block become one <mask> each; the decoder writes the block back.
    noise_density: float = 0.3
    mean_span_length: float = 3.0
    permute_sentences: bool = False  # also shuffle the lines / sentences of each block first
    show_reconstructions: int = 3  # eval examples reconstructed (greedy) and printed at the end of a run
    num_labels: int = 0  # classify: 0 = from the dataset
    passage_lines: int = 8  # shakespeare-genre: lines per passage
    baselines: bool = False  # classify: also score majority-class and bag-of-words logistic regression
    # classify: before fine-tuning, fit the new head by logistic regression on the pretrained model's
    # pooled features of this many training examples (a seeded sample; LP-FT); -1 = every training
    # example, 0 = the head's fresh init. With max_steps = 0 the probed head on the frozen model is the
    # classifier (a linear probe, no fine-tuning).
    probe_examples: int = 0
    probe_l2: float = 0.1  # the probe's L2 penalty on its weights over standardised features
    # Optimisation.
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum: int = 1
    max_steps: int = 100  # optimizer steps
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    schedule: str = "cosine"
    decay_fraction: float = 0.2  # wsd: the final fraction of steps that decays
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping
    precision: str = "fp32"
    activation_checkpointing: bool = False
    compile: bool = False
    backend: str | None = None  # ops backend for every kernel (PLM_ENGINE_BACKEND); None = automatic
    device: str = "auto"
    distributed: str = "auto"  # auto: DDP when launched by torchrun with WORLD_SIZE > 1
    seed: int = 0
    # Evaluation, logging, checkpoints.
    eval_every: int = 50
    eval_batches: int = 20  # global batches per eval; 0 = the whole eval split
    # classify: "accuracy", "macro_f1" or "loss" = every eval_every steps score a validation split carved
    # from the training data, keep the best weights (<out_dir>/best) and report the eval split for them
    keep_best: str = ""
    val_fraction: float = 0.1  # keep_best on jsonl data: the share of training rows that validates
    val_batches: int = 20  # keep_best: global batches per validation (a seeded sample); 0 = all of it
    log_every: int = 1
    save_every: int = 0  # 0 = only at the end (and on SIGINT/SIGTERM)
    keep_last: int = 3
    out_dir: str = "runs/train"
    resume: str | None = None  # "latest" (in out_dir/checkpoints) or a checkpoint folder
    progress: bool = True
    plot: bool = True
    peak_flops: float = 0.0  # for MFU; 0 = a table for GPUs, a short matmul probe on CPU

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        checks = [
            (self.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}, got {self.objective!r}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.distributed in DISTRIBUTED, f"distributed must be one of {DISTRIBUTED}, got {self.distributed!r}"),
            (
                self.dataset in ("text", "jsonl", "shakespeare-genre"),
                f"dataset must be 'text', 'jsonl' or 'shakespeare-genre', got {self.dataset!r}",
            ),
            (
                (self.model is None) != (self.init is None),
                f"give exactly one of model (a preset, from scratch) or init (a checkpoint); got model={self.model!r} "
                f"init={self.init!r}",
            ),
            (self.seq_len >= 2, f"seq_len must be >= 2, got {self.seq_len}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (
                self.max_steps >= 1 or (self.max_steps == 0 and self.probe_examples != 0),
                f"max_steps must be >= 1 (0 only with probe_examples: the probed head alone), got {self.max_steps}",
            ),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (0 < self.decay_fraction <= 1, f"decay_fraction must be in (0, 1], got {self.decay_fraction}"),
            (0 < self.mlm_probability < 1, f"mlm_probability must be in (0, 1), got {self.mlm_probability}"),
            (0 < self.noise_density < 1, f"noise_density must be in (0, 1), got {self.noise_density}"),
            (self.mean_span_length >= 1, f"mean_span_length must be >= 1, got {self.mean_span_length}"),
            (self.show_reconstructions >= 0, f"show_reconstructions must be >= 0, got {self.show_reconstructions}"),
            (0 <= self.eval_fraction < 1, f"eval_fraction must be in [0, 1), got {self.eval_fraction}"),
            (self.keep_last >= 1, f"keep_last must be >= 1, got {self.keep_last}"),
            (
                self.keep_best in KEEP_BEST,
                f"keep_best must be one of {KEEP_BEST[1:]} or empty, got {self.keep_best!r}",
            ),
            (
                not self.keep_best or (self.objective == "classify" and self.eval_every > 0),
                "keep_best selects a classifier's checkpoint on a validation split: it needs objective='classify' "
                f"and eval_every > 0, got objective={self.objective!r} eval_every={self.eval_every}",
            ),
            (
                self.probe_examples >= -1 and (not self.probe_examples or self.objective == "classify"),
                f"probe_examples must be >= -1 and needs objective='classify', got {self.probe_examples}",
            ),
            (self.probe_l2 >= 0, f"probe_l2 must be >= 0, got {self.probe_l2}"),
            (0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}"),
            (
                self.eval_batches >= 0 and self.val_batches >= 0,
                f"eval_batches/val_batches must be >= 0, got {self.eval_batches}/{self.val_batches}",
            ),
            (self.clip_grad >= 0, f"clip_grad must be >= 0, got {self.clip_grad}"),
            (
                self.eval_every >= 0 and self.save_every >= 0 and self.log_every >= 1,
                f"eval_every/save_every must be >= 0 and log_every >= 1, got {self.eval_every}/{self.save_every}/"
                f"{self.log_every}",
            ),
            (
                self.backend in (None, "triton", "cuda", "cpu", "torch"),
                f"backend must be triton, cuda, cpu, torch or unset, got {self.backend!r}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")
        if not self.data and self.dataset != "shakespeare-genre":
            raise ValueError("TrainConfig: data is empty; give text files/folders or 'shakespeare'")

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step on one process (the global figure multiplies by world size)."""
        return self.batch_size * self.grad_accum * self.seq_len

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d.get("train", d)) if isinstance(d.get("train"), dict) else dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"TrainConfig: unknown key(s) {unknown}; known: {sorted(names)}")
        for key in ("data", "eval_data"):
            if isinstance(d.get(key), str):
                d[key] = [d[key]]
        return cls(**d)

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: dict | None = None) -> TrainConfig:
        """Read a .toml / .yaml / .yml / .json file, then apply `overrides` (already typed values)."""
        d = read_config_file(path)
        d = dict(d.get("train", d)) if isinstance(d.get("train"), dict) else d
        d.update(overrides or {})
        return cls.from_dict(d)


def read_config_file(path: str | os.PathLike) -> dict:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    with open(path, "rb") as f:
        raw = f.read()
    if ext == ".toml":
        try:
            return tomllib.loads(raw.decode())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {path!r}: invalid TOML: {e}") from e
    if ext in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as e:
            raise RuntimeError(f"config file {path!r}: YAML needs PyYAML (pip install pyyaml) or use TOML") from e
        d = yaml.safe_load(raw) or {}
        if not isinstance(d, dict):
            raise ValueError(f"config file {path!r}: the top level must be a mapping, got {type(d).__name__}")
        return d
    if ext == ".json":
        return json.loads(raw)
    raise ValueError(f"config file {path!r}: unknown extension {ext!r} (use .toml, .yaml/.yml or .json)")


def parse_override(name: str, text: str) -> Any:
    """Convert a command-line string into the type of TrainConfig field `name`."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if name not in fields:
        raise ValueError(f"unknown TrainConfig field {name!r}")
    default = (
        fields[name].default if fields[name].default is not dataclasses.MISSING else fields[name].default_factory()
    )
    if isinstance(default, bool):
        low = text.lower()
        if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError(f"--{name.replace('_', '-')}: expected a boolean, got {text!r}")
        return low in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float):
        return float(text)
    if isinstance(default, list):
        return [t for t in text.split(",") if t]
    if isinstance(default, dict):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--{name.replace('_', '-')}: expected a JSON object, got {text!r}") from e
    if text.lower() in ("none", "null", ""):
        return None
    return text
