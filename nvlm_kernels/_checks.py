"""Argument checks shared by several ops."""

from __future__ import annotations

import math


def softmax_scale_from(softmax_scale, head_dim: int) -> float:
    """The attention ops' ``softmax_scale``: None means 1/sqrt(head_dim); else a positive finite float."""
    if softmax_scale is None:
        return head_dim**-0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be positive and finite, got {softmax_scale}")
    return float(softmax_scale)
