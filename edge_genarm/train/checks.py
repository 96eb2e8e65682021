"""What `edge-genarm train` refuses, checked before anything is written or loaded in earnest.

Contract: each check raises `UserError` with one line naming the option and what to do.
- `check_options(config, given)`: every number in its range (NaN and infinities refused), the
  LoRA targets known, no LoRA option given with --full (`given`: the options on the command line).
- `check_fits_base(config, base)`: --max-length within the base's context, --lora-r within its
  hidden size.
- `check_out(out, resume, force)`: --out a folder (created with its parents when missing); a
  finished run (arm.gguf) is not trained over without --force, an unfinished one (a checkpoint)
  neither without --resume or --force; --resume needs a checkpoint and an unfinished run.
- `run_settings(...)` is what a checkpoint records of its run; `check_resume(out, settings)`
  refuses to resume a checkpoint made with other settings, naming the first that differs.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path

from ..errors import UserError
from .base import LORA_MODULES, Base
from .trainer import CHECKPOINT, SETTINGS, TrainConfig

# (option, lowest, highest, whether the lowest itself is allowed, whether the highest is, rule)
_FLOATS = [
    ("beta", 0.0, 1000.0, False, True, "a finite number in (0, 1000]"),
    ("lr", 0.0, 1.0, False, True, "a finite number in (0, 1]"),
    ("warmup", 0.0, 1.0, True, False, "in [0, 1) (a fraction of the optimizer steps)"),
    ("lora_alpha", 0.0, 1e6, False, True, "a finite number in (0, 1000000]"),
    ("lora_dropout", 0.0, 1.0, True, False, "in [0, 1)"),
    ("eval_fraction", 0.0, 1.0, True, False, "in [0, 1) (0 holds nothing out)"),
]
_INTS = [
    ("epochs", 1, 10_000), ("batch_size", 1, 4096), ("grad_accum", 1, 4096),
    ("max_length", 2, None), ("seed", 0, 2**64 - 1), ("lora_r", 1, None), ("save_every", 1, None),
]
_LORA_OPTIONS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")
# options a resumed run may change: they decide when to save, not what is learned
_FREE_ON_RESUME = ("save_every",)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_options(config: TrainConfig, given: set[str] = frozenset()) -> None:
    for name, low, high, low_ok, high_ok, rule in _FLOATS:
        v = getattr(config, name)
        fits = (math.isfinite(v) and (low <= v if low_ok else low < v)
                and (v <= high if high_ok else v < high))
        if not fits:
            raise UserError(f"{flag(name)} must be {rule}, got {v}")
    for name, low, high in _INTS:
        v = getattr(config, name)
        if v < low or (high is not None and v > high):
            if high is None:
                raise UserError(f"{flag(name)} must be at least {low}, got {v}")
            shown = "2^64 - 1" if high == 2**64 - 1 else str(high)
            raise UserError(f"{flag(name)} must be between {low} and {shown}, got {v}")
    known = ", ".join(LORA_MODULES)
    if not config.lora_targets:
        raise UserError(f"--lora-targets names no module; name some of {known}")
    unknown = [t for t in config.lora_targets if t not in LORA_MODULES]
    if unknown:
        raise UserError(f"--lora-targets: {unknown[0]!r} is not a module a LoRA can adapt here; "
                        f"the valid ones are {known}")
    if config.full:
        extra = [n for n in _LORA_OPTIONS if n in given]
        if extra:
            raise UserError(f"{flag(extra[0])} sets the LoRA, which --full does not train; drop "
                            "one of the two")


def check_fits_base(config: TrainConfig, base: Base) -> None:
    if base.n_ctx and config.max_length > base.n_ctx:
        raise UserError(f"--max-length {config.max_length} is longer than the context the base "
                        f"was trained for ({base.n_ctx} tokens); pass at most {base.n_ctx}")
    if not config.full and base.n_embd and config.lora_r > base.n_embd:
        raise UserError(f"--lora-r {config.lora_r} is above the base's hidden size "
                        f"({base.n_embd}), where a rank stops adding anything; pass at most "
                        f"{base.n_embd}")


def output_name(config: TrainConfig) -> str:
    """The file a finished run writes in --out: an ARM, or a reward model."""
    return "arm.gguf" if config.objective == "arm" else "reward.gguf"


def check_out(out: Path, resume: bool, force: bool, output: str = "arm.gguf") -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; name a folder for the checkpoints and {output}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"--out {out}: {parent} is a file, not a folder; choose another "
                                "--out")
            break
    arm, state = out / output, out / CHECKPOINT / "state.pt"
    if resume:
        if arm.exists():
            raise UserError(f"--resume: the run in {out} is finished ({arm} exists); pass "
                            "--force instead to train again from the start")
        if not state.exists():
            raise UserError(f"--resume: no checkpoint in {out / CHECKPOINT}; run without "
                            "--resume to start training")
    elif not force:
        if arm.exists():
            what = "ARM" if output == "arm.gguf" else "reward model"
            raise UserError(f"--out {out} already holds a trained {what} ({arm}); pass --force to "
                            "train again from the start, or choose another --out")
        if state.exists():
            raise UserError(f"--out {out} holds the checkpoint of an unfinished run; pass "
                            "--resume to continue it, or --force to start over")


def run_settings(config: TrainConfig, base: Path, data: Path) -> dict:
    """Everything that decides what a run learns: its options, its base and its data."""
    options = {k: v for k, v in asdict(config).items() if k not in _FREE_ON_RESUME}
    settings = {"base": str(base.resolve()),
                "data_sha256": hashlib.sha256(data.read_bytes()).hexdigest(), **options}
    return json.loads(json.dumps(settings))  # tuples as lists, as the file holds them


def check_resume(out: Path, settings: dict) -> None:
    path = out / CHECKPOINT / SETTINGS
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return  # a checkpoint written before settings were recorded: nothing to compare
    except (OSError, ValueError):
        raise UserError(f"--resume: {path} is damaged; pass --force to start over") from None
    for key, value in settings.items():
        if saved.get(key) == value:
            continue
        if key not in saved and value == getattr(TrainConfig(), key, None):
            continue  # an option newer than the checkpoint, at the value it trained with
        where = f"--resume: the checkpoint in {out / CHECKPOINT} was made"
        if key == "base":
            raise UserError(f"{where} from --base {saved.get(key)}; resume with that base, or "
                            "pass --force to start over")
        if key == "data_sha256":
            raise UserError(f"{where} from other --data (the file's contents differ); resume "
                            "with the same data, or pass --force to start over")
        if isinstance(value, bool):
            raise UserError(f"{where} {'with' if saved.get(key) else 'without'} {flag(key)}; "
                            "resume with the same options, or pass --force to start over")
        was = ",".join(saved[key]) if isinstance(saved.get(key), list) else saved.get(key)
        now = ",".join(value) if isinstance(value, list) else value
        raise UserError(f"{where} with {flag(key)} {was}, not {now}; resume with the same "
                        "options, or pass --force to start over")
