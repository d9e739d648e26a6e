"""Routers: ``router(x_TD, task=None) -> Assignment``."""

from .base import RouterSpec
from .task import MultiGate, PathwayGate, TaskEmbedGate, TaskExperts
from .topk import TopK, TopKRouter

__all__ = ["MultiGate", "PathwayGate", "RouterSpec", "TaskEmbedGate", "TaskExperts", "TopK", "TopKRouter"]

# routing methods of the MoE literature (one module per family)
from .adamoe import AdaMoE
from .aoe import AoE
from .expert_choice import ExpertChoice
from .hash import Hash
from .moepp import HeteroBalanceLoss, MoEPP
from .sparsemixer import SparseMixer
from .smoe_dropout import SMoEDropout, advance_smoe_dropout, set_inference_k
from .thor import THOR, thor_consistency_loss
from .top_p import EntropyLoss, TopP
from .topk_free import TopKFree
from .topk_softmax import TopKSoftmax

__all__ += [
    "AdaMoE", "AoE", "EntropyLoss", "ExpertChoice", "Hash", "HeteroBalanceLoss", "MoEPP", "SMoEDropout",
    "SparseMixer", "THOR", "TopKFree", "TopKSoftmax", "TopP", "advance_smoe_dropout", "set_inference_k",
    "thor_consistency_loss",
]
