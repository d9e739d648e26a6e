"""Small datasets built from data that installed packages bundle (nothing is downloaded)."""

from .multidigit import MULTIDIGIT_TASKS, MultiDigit, TaskInfo, make_multidigit

__all__ = ["MULTIDIGIT_TASKS", "MultiDigit", "TaskInfo", "make_multidigit"]
