"""Training an upcycled model: the MoE aux losses in the objective and routing statistics in the logs.

Plain loop::

    loss = task_loss + moekit.aux_loss(model)      # every MoE layer's weighted balance losses of the last forward

transformers ``Trainer``::

    trainer = MoETrainer(model=model, args=args, train_dataset=ds)   # a drop-in Trainer
    trainer.train()     # logs moe_aux_loss, moe_max_over_mean, moe_dropped_fraction (and per layer if asked)

Importing this module imports transformers (and the Trainer needs ``accelerate``).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import Trainer

from ..layer import aux_loss
from ..stats import RoutingStats, _moe_layers, reset_routing_stats, routing_stats


def routing_metrics(stats: dict[str, RoutingStats], per_layer: bool = False, prefix: str = "moe_") -> dict[str, float]:
    """Scalars for a logger from accumulated routing statistics: the mean over layers of max/mean expert load,
    dropped fraction and each expert's share of the routed pairs (and the same per layer with ``per_layer``)."""
    out: dict[str, float] = {}
    if not stats:
        return out
    out[f"{prefix}max_over_mean"] = sum(s.max_over_mean for s in stats.values()) / len(stats)
    out[f"{prefix}dropped_fraction"] = sum(s.dropped_fraction for s in stats.values()) / len(stats)
    if per_layer:
        for name, s in stats.items():
            out[f"{prefix}{name}/max_over_mean"] = s.max_over_mean
            share = s.routed_per_expert_E.double() / max(s.num_pairs, 1)
            for e, v in enumerate(share.tolist()):
                out[f"{prefix}{name}/expert{e}_share"] = v
    return out


class MoETrainer(Trainer):
    """A ``transformers.Trainer`` that adds ``moekit.aux_loss(model)`` to the training loss and logs routing
    statistics (accumulated over the training steps since the last log; evaluation does not count).

    Args (besides Trainer's):
        moe_log_per_layer: also log each MoE layer's load and per-expert share.
    """

    def __init__(self, *args: Any, moe_log_per_layer: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.moe_log_per_layer = moe_log_per_layer
        self._moe_aux_sum = 0.0
        self._moe_aux_count = 0

    def compute_loss(self, model: nn.Module, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        training = model.training
        for _, m in _moe_layers(model):
            m.accumulate_stats = training
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if training:
            aux = aux_loss(model)
            self._moe_aux_sum += float(aux.detach())
            self._moe_aux_count += 1
            # the Trainer divides the loss by the accumulation steps unless it is already normalised over them
            scaled = getattr(self, "loss_is_scaled_for_ga", None)
            if scaled is None:
                scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                    self.compute_loss_func is not None
                )
            if scaled:
                aux = aux / self.current_gradient_accumulation_steps
            loss = loss + aux.to(loss.device)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._moe_aux_count:
            logs["moe_aux_loss"] = self._moe_aux_sum / self._moe_aux_count
            self._moe_aux_sum, self._moe_aux_count = 0.0, 0
        model = self.model
        stats = routing_stats(model)
        if stats:
            logs.update(routing_metrics(stats, self.moe_log_per_layer))
            reset_routing_stats(model)
        super().log(logs, *args, **kwargs)


__all__ = ["MoETrainer", "aux_loss", "routing_metrics"]
