"""Training an ARM on preference pairs with PyTorch.

Contract: `train(base_dir, pairs, config, out_dir)` fine-tunes the causal LM in `base_dir` (LoRA
through peft by default, every weight with `full=True`) on
    loss = -log sigmoid(beta * (log pi(chosen | prompt) - log pi(rejected | prompt)))
with log pi the sum (or, with length_norm, the mean) of the response tokens' log-probs and no
reference model, as GenARM trains its ARMs; with objective partial-bt or full-bt it trains a
scalar reward model instead (the backbone and a linear head, train/reward.py). It checkpoints to out_dir/checkpoint every
`save_every` optimizer steps and at the end of each epoch (state.pt written beside and renamed,
so a kill at any instant leaves the previous checkpoint whole); `resume=True` continues from
there with the same data order, optimizer, schedule and random state, so that a run killed and
resumed ends as an uninterrupted one. A fresh start clears the checkpoint and records `settings`
(what a resume must match) in checkpoint/settings.json. An optimizer step takes `grad_accum`
batches, the last of an epoch fewer. `on_step(step, total, loss, accuracy)` reports progress.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import UserError
from ..files import staged, write_text
from .data import Pair, batch_tensors

CHECKPOINT = "checkpoint"
SETTINGS = "settings.json"


@dataclass(frozen=True)
class TrainConfig:
    beta: float = 0.1
    lr: float = 5e-4
    schedule: str = "cosine"        # linear, cosine or constant, after warmup
    warmup: float = 0.05            # fraction of the optimizer steps
    epochs: int = 1
    batch_size: int = 4             # pairs per forward pass
    grad_accum: int = 1
    max_length: int = 256
    seed: int = 0
    full: bool = False              # full fine-tuning instead of LoRA
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    length_norm: bool = False
    eval_fraction: float = 0.1
    save_every: int = 50
    objective: str = "arm"          # arm; or a reward model: partial-bt, full-bt


@dataclass
class TrainResult:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)      # per optimizer step
    accuracies: list[float] = field(default_factory=list)  # per optimizer step
    eval_accuracy: float | None = None
    eval_pairs: int = 0


def split(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """A seeded held-out split (at least one pair held out when fraction > 0)."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(pairs) - 1, max(1, round(fraction * len(pairs)))) if fraction > 0 else 0
    held = set(order[:n_eval])
    return ([p for i, p in enumerate(pairs) if i not in held],
            [p for i, p in enumerate(pairs) if i in held])


def sequence_logps(torch, model, ids, attention, response, length_norm: bool):
    """Sum (or mean) over response tokens of log pi(token | everything before it)."""
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
    logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    mask = response[:, 1:].float()
    total = (logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if length_norm else total


def pair_loss(torch, model, batch, config: TrainConfig, pad_id: int):
    if config.objective != "arm":
        from .reward import reward_pair_loss

        return reward_pair_loss(torch, model, batch, config.objective, pad_id)
    ids, attention, response = batch_tensors(torch, batch, pad_id)
    logps = sequence_logps(torch, model, ids, attention, response, config.length_norm)
    chosen, rejected = logps[:len(batch)], logps[len(batch):]
    margin = config.beta * (chosen - rejected)
    loss = -torch.nn.functional.logsigmoid(margin).mean()
    return loss, (chosen > rejected).float().mean().item()


def load_model(base_dir: Path, config: TrainConfig):
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(config.seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if not config.full:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                          lora_dropout=config.lora_dropout,
                          target_modules=list(config.lora_targets), task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    if config.objective != "arm":  # a reward model: the backbone and a head on its last state
        from .reward import RewardNet

        model = RewardNet(model)
    return model


def train(base_dir: Path, pairs: list[Pair], config: TrainConfig, out_dir: Path,
          pad_id: int = 0, resume: bool = False,
          on_step: Callable[[int, int, float, float], None] | None = None,
          settings: dict | None = None):
    import torch
    import transformers

    train_pairs, eval_pairs = split(pairs, config.eval_fraction, config.seed)
    model = load_model(base_dir, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    per_epoch = math.ceil(len(train_pairs) / config.batch_size)
    total = steps_per_epoch(per_epoch, config.grad_accum) * config.epochs
    scheduler = transformers.get_scheduler(config.schedule, optimizer,
                                           num_warmup_steps=int(config.warmup * total),
                                           num_training_steps=total)
    result, start_batch = TrainResult(steps=0, seconds=0.0), 0
    ckpt = out_dir / CHECKPOINT / "state.pt"
    if resume:
        if not ckpt.exists():
            raise UserError(f"--resume: no checkpoint in {out_dir / CHECKPOINT}")
        state = torch.load(ckpt, weights_only=False)  # our own file, written below
        _trainable_load(model, state["weights"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        result = TrainResult(**state["result"])
        start_batch = state["batch"]
        torch.set_rng_state(state["rng"])  # dropout masks continue as they would have
    else:
        start_fresh(out_dir / CHECKPOINT, settings or {})
    t0 = time.perf_counter() - result.seconds
    model.train()
    batch_index = 0
    for epoch in range(config.epochs):
        order = list(range(len(train_pairs)))
        random.Random(config.seed + epoch).shuffle(order)  # the same order on resume
        for b in range(per_epoch):
            batch_index += 1
            if batch_index <= start_batch:
                continue
            size = config.batch_size
            batch = [train_pairs[i] for i in order[b * size:(b + 1) * size]]
            loss, acc = pair_loss(torch, model, batch, config, pad_id)
            # each step's gradient is the mean over its batches, however many the last one has
            group = b - b % config.grad_accum
            (loss / (min(group + config.grad_accum, per_epoch) - group)).backward()
            if (b + 1) % config.grad_accum == 0 or b == per_epoch - 1:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                result.steps += 1
                result.losses.append(loss.item())
                result.accuracies.append(acc)
                if on_step:
                    on_step(result.steps, total, loss.item(), acc)
                if result.steps % config.save_every == 0 or b == per_epoch - 1:
                    result.seconds = time.perf_counter() - t0
                    _save(torch, ckpt, model, optimizer, scheduler, result, batch_index)
    result.seconds = time.perf_counter() - t0
    result.eval_pairs = len(eval_pairs)
    if eval_pairs:
        result.eval_accuracy = evaluate(torch, model, eval_pairs, config, pad_id)
    return model, result


def steps_per_epoch(batches: int, grad_accum: int) -> int:
    """Optimizer steps in an epoch of `batches`: one per grad_accum batches, and at its end."""
    return math.ceil(batches / grad_accum)


def start_fresh(ckpt_dir: Path, settings: dict) -> None:
    """Forget any earlier checkpoint, then record the settings this run's checkpoints belong to
    (none given: none recorded, and a resume has nothing to compare)."""
    for name in ("state.pt", "state.part", "progress.json", SETTINGS):
        (ckpt_dir / name).unlink(missing_ok=True)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if settings:
        write_text(ckpt_dir / SETTINGS, json.dumps(settings, indent=1, sort_keys=True))


def evaluate(torch, model, pairs: list[Pair], config: TrainConfig, pad_id: int) -> float:
    model.eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(pairs), config.batch_size):
            batch = pairs[i:i + config.batch_size]
            _, acc = pair_loss(torch, model, batch, config, pad_id)
            right += acc * len(batch)
    model.train()
    return right / len(pairs)


def _trainable_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def _trainable_load(model, weights: dict) -> None:
    names = dict(model.named_parameters())
    for key, value in weights.items():
        names[key].data.copy_(value)


def _save(torch, path: Path, model, optimizer, scheduler, result, batch_index) -> None:
    """Write the checkpoint beside, then rename: a kill mid-save keeps the previous one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged(path) as tmp:
        torch.save({"weights": _trainable_state(model), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "result": asdict(result),
                    "batch": batch_index, "rng": torch.get_rng_state()}, tmp)
    write_text(path.parent / "progress.json", json.dumps(
        {"steps": result.steps, "batches": batch_index, "seconds": round(result.seconds, 1)}))
