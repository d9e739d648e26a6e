"""Multi-task training as M3ViT does it: for each batch, zero the gradients, then for every task run the model
with that task's routing and head and call ``backward`` on w_t * L_t + (the MoE layers' aux loss); gradients add
up over the tasks, then one optimizer step.

Deterministic: the batch order comes from a generator seeded by (seed, epoch), the learning rate is a function of
the step, and nothing else draws random numbers, so a run resumed from a checkpoint continues exactly
(``tests/test_vit_checkpoint.py``). AdamW is used instead of M3ViT's SGD because it converges in the few hundred
steps a CPU demo can afford.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layer import aux_loss
from ..io import write_checkpoint
from .checkpoint import (
    FORMAT,
    LEGACY_FILES,
    TRAINER_FILE,
    CheckpointError,
    _load_model_and_step,
    flatten_optimizer,
    load_tensors,
    model_files,
    tensor_bytes,
    unflatten_optimizer,
)
from .vit import MultiTaskViT


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 500  # optimizer steps (each one covers every task)
    batch_size: int = 64
    lr: float = 2e-3  # peak AdamW learning rate
    weight_decay: float = 0.05
    warmup_steps: int = 20  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.05
    grad_clip: float | None = 1.0  # max global grad norm; None disables clipping
    task_weights: tuple | None = None  # w_t per task in model order; default all 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"TrainConfig: need steps >= 0, batch_size >= 1, lr > 0; got {self}")
        if self.task_weights is not None:
            object.__setattr__(self, "task_weights", tuple(float(w) for w in self.task_weights))

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def task_loss(kind: str, logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy per image (classify) or per pixel (segment), averaged."""
    return F.cross_entropy(logits, target)


class MultiTaskTrainer:
    """Trains a :class:`MultiTaskViT` on a dataset with ``images`` and ``targets[task name]`` (e.g. MultiDigit).

    >>> trainer = MultiTaskTrainer(model, train_set, TrainConfig(steps=300))  # doctest: +SKIP
    >>> trainer.fit(checkpoint_dir="run/ckpt", checkpoint_every=100)  # doctest: +SKIP
    >>> trainer = MultiTaskTrainer.resume("run/ckpt", train_set)  # continues exactly  # doctest: +SKIP
    """

    def __init__(self, model: MultiTaskViT, data, config: TrainConfig, *, progress: bool = True,
                 desc: str = "train", bar_position: int | None = None) -> None:
        missing = [t.name for t in model.config.tasks if t.name not in data.targets]
        if missing:
            raise ValueError(f"the dataset has no targets for tasks {missing}; it has {sorted(data.targets)}")
        if config.task_weights is not None and len(config.task_weights) != len(model.config.tasks):
            raise ValueError(f"TrainConfig.task_weights has {len(config.task_weights)} entries for "
                             f"{len(model.config.tasks)} tasks")
        if len(data) < config.batch_size:
            raise ValueError(f"the dataset has {len(data)} examples, fewer than batch_size={config.batch_size}")
        self.model, self.data, self.config = model, data, config
        self.progress, self.desc, self.bar_position = progress, desc, bar_position
        decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "pos_embed" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "pos_embed" not in n)]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr_at(0),
        )
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.run_id = uuid.uuid4().hex  # ties every checkpoint of this run together; kept across resumes

    # -- data order -----------------------------------------------------------------------------------------
    def batch_indices(self, step: int) -> Tensor:
        per_epoch = len(self.data) // self.config.batch_size
        epoch, offset = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.data), generator=g)
        return perm[offset * self.config.batch_size:(offset + 1) * self.config.batch_size]

    # -- one step -------------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        model, c = self.model, self.config
        model.train()
        idx = self.batch_indices(self.step)
        images = self.data.images[idx]
        weights = c.task_weights or (1.0,) * len(model.config.tasks)
        lr = c.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        record: dict[str, float] = {"step": self.step + 1, "lr": lr}
        aux_total = 0.0
        for t, (head, w) in enumerate(zip(model.config.tasks, weights)):
            logits = model(images, t)
            loss = task_loss(head.kind, logits, self.data.targets[head.name][idx])
            aux = aux_loss(model)
            (w * loss + aux).backward()  # gradients accumulate over the tasks
            record[f"loss/{head.name}"] = float(loss.detach())
            aux_total += float(aux.detach()) if isinstance(aux, Tensor) else float(aux)
        record["aux"] = aux_total
        if c.grad_clip is not None:
            record["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip))
        self.optimizer.step()
        self.step += 1
        self.history.append(record)
        return record

    def fit(self, steps: int | None = None, *, checkpoint_dir: str | os.PathLike | None = None,
            checkpoint_every: int = 0, on_step: Callable[[dict], None] | None = None) -> list[dict[str, float]]:
        """Train until ``steps`` (default ``config.steps``) total steps, with a progress bar; save a checkpoint
        every ``checkpoint_every`` steps and at the end when ``checkpoint_dir`` is given."""
        end = self.config.steps if steps is None else steps
        bar = _progress(total=end, initial=self.step, desc=self.desc, enabled=self.progress,
                        position=self.bar_position)
        try:
            while self.step < end:
                rec = self.train_step()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in rec.items() if k.startswith("loss/")})
                if on_step is not None:
                    on_step(rec)
                if checkpoint_dir is not None and checkpoint_every and self.step % checkpoint_every == 0:
                    self.save(checkpoint_dir)
        finally:
            if bar is not None:
                bar.close()
        if checkpoint_dir is not None:
            self.save(checkpoint_dir)
        return self.history

    # -- checkpoints ----------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Weights, config and trainer state as one new save of ``folder``: all three files or none (see
        :mod:`moekit.io`); the previous save stays loadable until this one is complete."""
        optim_tensors, optim_meta = flatten_optimizer(self.optimizer)
        tensors = {**optim_tensors, "rng.torch": torch.get_rng_state()}
        meta = {
            "step": str(self.step),
            "run_id": self.run_id,
            "train_config": json.dumps(asdict(self.config)),
            "optimizer": json.dumps(optim_meta),
            "history": json.dumps(self.history),
        }
        files = {TRAINER_FILE: tensor_bytes(tensors, meta),
                 **model_files(self.model, self.step, {"run_id": self.run_id})}
        write_checkpoint(folder, files, kind=FORMAT, meta={"step": self.step, "run_id": self.run_id},
                         remove=LEGACY_FILES)
        return Path(folder)

    @classmethod
    def resume(cls, folder: str | os.PathLike, data, *, config: TrainConfig | None = None, progress: bool = True,
               desc: str = "train", verify: bool = True) -> "MultiTaskTrainer":
        """Rebuild model, optimizer, step, history, run id and RNG state from ``folder``. ``config`` may change
        ``steps`` only (any other difference would not continue the same run and is refused)."""
        model, step, files = _load_model_and_step(folder, verify=verify)
        if TRAINER_FILE not in files:
            raise CheckpointError(f"checkpoint {folder} has no trainer state ({TRAINER_FILE}): it holds weights only "
                                  "(save_model); a run is resumed from a MultiTaskTrainer.save folder")
        tensors, meta = load_tensors(files[TRAINER_FILE])
        _, model_meta = load_tensors(files["model.safetensors"])
        try:
            saved_config = TrainConfig(**json.loads(meta["train_config"]))
            optim_state = unflatten_optimizer(tensors, json.loads(meta["optimizer"]))
            history = json.loads(meta["history"])
            trainer_step = int(meta["step"])
            rng = tensors["rng.torch"]
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"corrupt trainer state in {folder}: {type(e).__name__}: {e}") from None
        if trainer_step != step:
            raise CheckpointError(f"checkpoint {folder}: trainer state is from step {trainer_step} but the model "
                                  f"from step {step} (an interrupted save?)")
        run_id = meta.get("run_id")
        if run_id != model_meta.get("run_id"):
            raise CheckpointError(f"checkpoint {folder}: the trainer state is from another run (run {run_id}) than "
                                  f"the weights (run {model_meta.get('run_id')}); refusing to resume")
        if config is not None:
            changed = sorted(k for k, v in asdict(config).items() if k != "steps" and asdict(saved_config)[k] != v)
            if changed:
                raise CheckpointError(
                    f"resume({folder}): config differs from the checkpoint's run in {changed} (only steps may "
                    f"change); saved {[(k, asdict(saved_config)[k]) for k in changed]}"
                )
        trainer = cls(model, data, config or saved_config, progress=progress, desc=desc)
        try:
            trainer.optimizer.load_state_dict(optim_state)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {folder}: optimizer state does not fit the model: {e}") from None
        trainer.step, trainer.history = step, history
        trainer.run_id = run_id or trainer.run_id
        torch.set_rng_state(rng)
        return trainer


def _progress(total: int, initial: int, desc: str, enabled: bool, position: int | None = None):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return None
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=True,
                position=position)
