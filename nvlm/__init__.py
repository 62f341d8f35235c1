"""Thin NVLM-D / NVLM-X / NVLM-H model layer built on the public API of nvlm_kernels.

    import nvlm
    model = nvlm.build_model("tiny-h")                          # or "nvlm-d-72b" on device="meta"
    model = nvlm.from_pretrained("NVLM-D-72B", device="cuda")   # a downloaded Hugging Face NVLM-D directory
    processor = nvlm.NVLMProcessor(nvlm.ByteTokenizer(), model.config)
    out = model(processor([{"role": "user", "content": "<image> What is this?"}], [image]))

Modules: ``config`` (NVLMConfig and presets), ``vision`` (InternViT), ``projector`` (mlp1),
``llm`` (Qwen2 decoder with a KV cache), ``xattn`` (gated cross-attention blocks), ``model`` (the
three variants), ``processor`` (ChatML prompts with tiles and tags), ``tokenizer`` (a byte
tokenizer for the tiny presets), ``checkpoint`` (Hugging Face NVLM-D and our own safetensors),
``training`` (what each stage trains), ``generate`` (sampling with KV caches), ``cli`` (``nvlm run``,
``nvlm profile``), ``profiling`` (per-stage times from the NVTX ranges).
"""

from nvlm.checkpoint import from_pretrained
from nvlm.config import PRESETS as MODEL_PRESETS
from nvlm.config import NVLMConfig
from nvlm.generate import GenerationOutput
from nvlm.model import NVLM, CrossAttentionCache, NVLMOutput, build_model, parameter_counts
from nvlm.processor import SFT_SYSTEM_PROMPT, NVLMInputs, NVLMProcessor
from nvlm.projector import PRESETS, MLPProjector
from nvlm.tokenizer import ByteTokenizer
from nvlm.training import freeze_for_stage

__all__ = [
    "MODEL_PRESETS",
    "NVLM",
    "PRESETS",
    "SFT_SYSTEM_PROMPT",
    "ByteTokenizer",
    "CrossAttentionCache",
    "GenerationOutput",
    "MLPProjector",
    "NVLMConfig",
    "NVLMInputs",
    "NVLMOutput",
    "NVLMProcessor",
    "build_model",
    "freeze_for_stage",
    "from_pretrained",
    "parameter_counts",
]
