"""Multi-task MoE vision transformer (M3ViT / Edge-MoE): model, FLOPs, training, checkpoints, pathway extraction."""

from .vit import MultiTaskViT, TaskHead, ViTConfig, with_approximations

__all__ = ["MultiTaskViT", "TaskHead", "ViTConfig", "with_approximations"]
