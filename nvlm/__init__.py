"""Thin NVLM-D / NVLM-X / NVLM-H model layer built on the public API of nvlm_kernels.

So far: ``MLPProjector``, the vision-to-language projector ("mlp1"), loadable from Hugging Face
checkpoints by its parameter names. The decoder, cross-attention layers and the whole models follow
(issue 7).
"""

from nvlm.projector import PRESETS, MLPProjector

__all__ = ["PRESETS", "MLPProjector"]
