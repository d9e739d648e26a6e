"""Expert parallelism on torch.distributed: routed experts sharded over an expert-parallel (EP) group with tokens
exchanged by all-to-all, combined with data parallelism (DP), global-batch load balancing, sharded checkpoints.

    groups = init_distributed(ep_size=2, timeout_s=120)      # under torchrun
    model = build_model()                                    # same seed on every rank
    apply_expert_parallel(model, groups, global_balance=True)   # checks that every rank built the same model
    ...
    loss.backward(); reduce_gradients(model, groups); opt.step(); update_balance_bias_distributed(model)

With FSDP2: ``plan = apply_fsdp(model, groups, dense="fsdp")`` after ``apply_expert_parallel``, the optimizer
built after it, and ``plan.reduce_gradients()`` instead of ``reduce_gradients``. Distributed checkpoints with the
optimizer state, loadable at any mesh: ``save_dcp(model, opt, root, groups)`` / ``load_dcp(model, opt, root, groups)``.

See docs/parallel.md.
"""

from .balance import (
    GlobalBatchSwitchLoss,
    attach_bias_update_distributed,
    sync_balance_counts,
    update_balance_bias_distributed,
    use_global_batch_balance,
)
from .checkpoint import load_sharded, read_meta, save_sharded
from .comm import CollectiveError, CommCounter, all_to_all, exchange_counts
from .consistency import ConsistencyError, model_fingerprint, verify_consistent
from .dcp import consolidate, load_dcp, read_latest, save_dcp
from .dispatcher import AllToAllDispatcher, ExchangeHandle
from .grads import broadcast_parameters, reduce_dense_gradients, reduce_expert_gradients, reduce_gradients, wrap_ddp
from .fsdp import FSDPPlan, ParallelMesh, apply_fsdp, build_mesh, memory_per_rank
from .groups import ParallelGroups, build_groups, group_layout, init_distributed
from .launch import free_port, spawn_local
from .shard import ExpertShard, apply_expert_parallel, dense_parameters, expert_parameters, expert_shard, shard_experts

__all__ = [
    "AllToAllDispatcher", "CollectiveError", "CommCounter", "ConsistencyError", "ExchangeHandle", "ExpertShard",
    "FSDPPlan", "ParallelMesh", "apply_fsdp", "build_mesh", "consolidate", "load_dcp", "memory_per_rank",
    "model_fingerprint", "read_latest", "save_dcp", "verify_consistent",
    "GlobalBatchSwitchLoss", "ParallelGroups", "all_to_all", "apply_expert_parallel",
    "attach_bias_update_distributed", "broadcast_parameters", "build_groups", "dense_parameters",
    "exchange_counts", "expert_parameters", "expert_shard", "free_port", "group_layout", "init_distributed",
    "load_sharded", "read_meta", "reduce_dense_gradients", "reduce_expert_gradients", "reduce_gradients",
    "save_sharded", "shard_experts", "spawn_local", "sync_balance_counts", "update_balance_bias_distributed",
    "use_global_batch_balance", "wrap_ddp",
]
