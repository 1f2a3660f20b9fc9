"""Re-exported from :mod:`slugkit.common.outputs` (the Python API checks outputs the same way)."""

from ..common.outputs import out_inside_model, out_inside_run

__all__ = ["out_inside_model", "out_inside_run"]
