"""Train one language model (MoE or dense) on :class:`~moekit.lm.data.DomainData`, resumably.

A run folder holds ``state.pt`` (model, optimizer, step) and ``manifest.json`` (config, step, losses, CPU time),
both written with :func:`moekit.io.atomic_write` every ``ckpt_every`` steps, so a killed run resumes from its last
checkpoint with the same batches (batches are a function of the seed and the step). The loss is next-token
cross-entropy plus the MoE layers' balance losses (:func:`moekit.aux_loss`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write
from ..layer import aux_loss, update_balance_bias
from .data import DomainData
from .model import LM

MANIFEST = "manifest.json"
_RESUMABLE = ("max_seconds", "anneal_by_time")  # settings a resumed run may change
STATE = "state.pt"


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation settings.

    Args:
        steps: optimizer steps (the run stops earlier if ``max_seconds`` of wall time pass).
        batch_size: sequences per step (domains take turns).
        lr: peak AdamW learning rate (linear warm-up over ``warmup`` steps, cosine decay to 10%).
        weight_decay: AdamW weight decay.
        warmup: warm-up steps.
        max_seconds: wall-clock budget of the run (None: no limit), counted over resumed calls too.
        anneal_by_time: with ``max_seconds``, the cosine decay runs on whichever comes first, the steps or the
            time (position ``max(step / steps, elapsed / max_seconds)``), so a run stopped by the clock still ends
            at the low learning rate; without it the schedule assumes ``steps`` and a stopped run ends mid-decay.
        ckpt_every: steps between checkpoints.
        eval_every: steps between validation evaluations (0: only at the end).
        seed: model initialisation and data order.
    """

    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: int = 30
    max_seconds: float | None = None
    anneal_by_time: bool = False
    ckpt_every: int = 100
    eval_every: int = 0
    seed: int = 0

    def lr_at(self, step: int, elapsed: float = 0.0) -> float:
        """Learning rate at ``step`` (``elapsed``: wall seconds of the run so far, used with ``anneal_by_time``)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        if self.anneal_by_time and self.max_seconds:
            t = max(t, elapsed / self.max_seconds)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@torch.no_grad()
def evaluate(lm: LM, data: DomainData, *, batch_size: int = 8) -> dict[str, Any]:
    """Validation perplexity per domain and, for an MoE, each layer's share of routed tokens per expert per
    domain (``usage[layer][domain] = [share of expert 0, ...]``)."""
    model = lm.model
    was = model.training
    model.eval()
    ppl, usage = {}, [dict() for _ in lm.moe_layers]
    try:
        for d, blocks in data.val.items():
            for moe in lm.moe_layers:
                moe.accumulate_stats, moe.stats_total = True, None
            nll, n = 0.0, 0
            for i in range(0, blocks.shape[0], batch_size):
                x = blocks[i:i + batch_size]
                logits = model(input_ids=x[:, :-1]).logits.float()
                nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                               x[:, 1:].reshape(-1), reduction="sum"))
                n += x[:, 1:].numel()
            ppl[d] = math.exp(nll / n)
            for j, moe in enumerate(lm.moe_layers):
                routed = moe.stats_total.routed_per_expert_E.double()
                usage[j][d] = (routed / routed.sum().clamp_min(1)).tolist()
                moe.accumulate_stats, moe.stats_total = False, None
    finally:
        model.train(was)
    return {"ppl": ppl, "usage": usage}


def _save(run: Path, lm: LM, opt: torch.optim.Optimizer, manifest: dict[str, Any]) -> None:
    state = {"model": lm.model.state_dict(), "optimizer": opt.state_dict(), "step": manifest["step"]}
    atomic_write(run / STATE, lambda tmp: torch.save(state, tmp))
    atomic_write(run / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))


def train_lm(lm: LM, data: DomainData, cfg: TrainConfig, run_dir: str | Path, *, resume: bool = True,
             progress: bool = True, desc: str = "train") -> dict[str, Any]:
    """Train ``lm`` in place; returns the manifest (losses, tokens/s, CPU seconds, final validation).

    ``resume``: continue from ``run_dir`` if it holds a checkpoint of the same configuration (else start over).
    """
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    model = lm.model
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    ident = {"train": asdict(cfg), "model": lm.cfg.to_dict(), "kind": lm.kind}
    manifest: dict[str, Any] = {**ident, "step": 0, "tokens": 0, "loss": [], "aux": [], "cpu_seconds": 0.0,
                                "wall_seconds": 0.0, "evals": []}
    if resume and (run / MANIFEST).exists() and (run / STATE).exists():
        old = json.loads((run / MANIFEST).read_text())
        same = all(old.get(k) == v for k, v in ident.items() if k != "train") and \
            {k: v for k, v in old["train"].items() if k not in _RESUMABLE} == \
            {k: v for k, v in ident["train"].items() if k not in _RESUMABLE}
        if same:
            state = torch.load(run / STATE, weights_only=True)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            manifest = old
    model.train()
    start_step = manifest["step"]
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    wall0, cpu0 = manifest["wall_seconds"], manifest["cpu_seconds"]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc=desc, dynamic_ncols=True, leave=True)
    step = start_step
    try:
        while step < cfg.steps:
            elapsed = wall0 + time.perf_counter() - t_wall
            if cfg.max_seconds is not None and elapsed > cfg.max_seconds:
                break
            ids, _ = data.batch(step, cfg.batch_size, cfg.seed)
            for g in opt.param_groups:
                g["lr"] = cfg.lr_at(step, elapsed)
            out = model(input_ids=ids[:, :-1], labels=None)
            logits = out.logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            aux = aux_loss(model) if lm.kind == "moe" else torch.zeros(())
            opt.zero_grad(set_to_none=True)
            (loss + aux).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if lm.kind == "moe":
                update_balance_bias(model)
            step += 1
            manifest["loss"].append(round(float(loss.detach()), 5))
            manifest["aux"].append(round(float(aux.detach()), 6))
            manifest["tokens"] += ids[:, 1:].numel()
            manifest["step"] = step
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss):.3f}")
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                manifest["evals"].append({"step": step, **evaluate(lm, data)})
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                manifest["wall_seconds"] = wall0 + time.perf_counter() - t_wall
                manifest["cpu_seconds"] = cpu0 + time.process_time() - t_cpu
                _save(run, lm, opt, manifest)
    finally:
        if bar is not None:
            bar.close()
    manifest["wall_seconds"] = wall0 + time.perf_counter() - t_wall
    manifest["cpu_seconds"] = cpu0 + time.process_time() - t_cpu
    manifest["finished"] = step >= cfg.steps
    trained = step - start_step
    manifest["tokens_per_second"] = (
        manifest["tokens"] / manifest["wall_seconds"] if manifest["wall_seconds"] > 0 else float("nan")
    )
    manifest["steps_this_call"] = trained
    final = evaluate(lm, data)
    manifest["final"] = {"step": step, **final}
    manifest["params"] = lm.num_params()
    _save(run, lm, opt, manifest)
    return manifest
