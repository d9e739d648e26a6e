from .grouped import grouped_linear, grouped_mm_available

__all__ = ["grouped_linear", "grouped_mm_available"]
