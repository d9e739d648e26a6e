"""moekit: Mixture-of-Experts layers for PyTorch.

The public API: ``MoE`` and its specs. Optional dependencies (transformers, matplotlib) are imported lazily by the
submodules that need them, so ``import moekit`` needs only torch.
"""

from .assignment import Assignment
from .balance import AuxFree, CV2Loss, SwitchLoss, ZLoss
from .dispatch import Capacity, Dropless
from .experts import FFN, MLP, SwiGLU
from .layer import MoE, MoEConfig, MoEOutput, attach_bias_update, aux_loss, update_balance_bias
from .protocols import RouteContext
from .replay import record_routing, replay_routing
from .routers import TopK
from .stats import RoutingStats, reset_routing_stats, routing_stats, track_routing

__version__ = "0.1.0"

__all__ = [
    "Assignment", "AuxFree", "CV2Loss", "Capacity", "Dropless", "FFN", "MLP", "MoE", "MoEConfig", "MoEOutput",
    "RouteContext", "RoutingStats", "SwiGLU", "SwitchLoss", "TopK", "ZLoss", "attach_bias_update", "aux_loss",
    "record_routing", "replay_routing", "reset_routing_stats", "routing_stats", "track_routing", "update_balance_bias",
]

# routing methods of the MoE literature (docs/routers.md)
from .experts import AoEExperts, HeteroFFN, SizePenalty  # noqa: E402
from .routers import AdaMoE, AoE, EntropyLoss, ExpertChoice, Hash, HeteroBalanceLoss, MoEPP  # noqa: E402
from .routers import SMoEDropout, THOR, TopP, thor_consistency_loss  # noqa: E402

__all__ += [
    "AdaMoE", "AoE", "AoEExperts", "EntropyLoss", "ExpertChoice", "Hash", "HeteroBalanceLoss", "HeteroFFN", "MoEPP",
    "SMoEDropout", "SizePenalty", "THOR", "TopP", "thor_consistency_loss",
]

# per-example expert merging (docs/smear.md) and Union of Experts (docs/uoe.md)
from .merging import SMEAR, SMEARConfig, reinforce_loss  # noqa: E402
from .uoe import HeadExperts, SlicedMLP, TokenSelection  # noqa: E402

__all__ += ["HeadExperts", "SMEAR", "SMEARConfig", "SlicedMLP", "TokenSelection", "reinforce_loss"]

# task routers for multi-task MoE (M3ViT / Edge-MoE; docs/demo.md); the multi-task ViT lives in moekit.models
from .routers import MultiGate, TaskEmbedGate, TaskExperts  # noqa: E402

__all__ += ["MultiGate", "TaskEmbedGate", "TaskExperts"]

# upcycling dense transformers into MoE (docs/upcycling.md); save/load and the Trainer live in moekit.convert
from .convert.upcycle import UnitGate, UpcycleConfig, train_only_moe_, upcycle_  # noqa: E402

__all__ += ["UnitGate", "UpcycleConfig", "train_only_moe_", "upcycle_"]
