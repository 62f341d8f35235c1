"""Which parts train in each stage of the paper's recipe (spec §8.3, Tables 10 and 11).

The ViT is always frozen. Pretraining trains only the modality-alignment modules: NVLM-D the MLP
projector, NVLM-X the cross-attention layers, NVLM-H both. SFT adds the LLM. Labels are masked to
the assistant's tokens by ``nvlm.processor`` (-100 elsewhere, image positions included).
"""

from __future__ import annotations

from torch import nn

STAGES = ("pretrain", "sft")

TRAINABLE: dict[tuple[str, str], tuple[str, ...]] = {
    ("D", "pretrain"): ("projector",),
    ("X", "pretrain"): ("xattn",),
    ("H", "pretrain"): ("xattn", "projector"),
    ("D", "sft"): ("projector", "llm"),
    ("X", "sft"): ("xattn", "llm"),
    ("H", "sft"): ("xattn", "projector", "llm"),
}

# The paper's optimizer settings per stage and variant (Tables 10 / 11): AdamW with cosine decay.
OPTIMIZER: dict[tuple[str, str], dict[str, object]] = {
    ("D", "pretrain"): {"lr": 1e-4, "min_lr": 2.5e-5, "betas": (0.9, 0.95), "weight_decay": 0.1, "clip": 10.0},
    ("X", "pretrain"): {"lr": 1e-4, "min_lr": 1e-5, "betas": (0.9, 0.95), "weight_decay": 0.05, "clip": 1.0},
    ("H", "pretrain"): {"lr": 1e-4, "min_lr": 1e-5, "betas": (0.9, 0.98), "weight_decay": 0.05, "clip": 1.0},
    ("D", "sft"): {"lr": 2e-6, "min_lr": 2.5e-7, "betas": (0.9, 0.98), "weight_decay": 0.1, "clip": 10.0},
    ("X", "sft"): {"lr": 1e-5, "min_lr": 1e-7, "betas": (0.9, 0.98), "weight_decay": 0.05, "clip": 1.0},
    ("H", "sft"): {"lr": 1e-5, "min_lr": 1e-7, "betas": (0.9, 0.98), "weight_decay": 0.05, "clip": 1.0},
}


def trainable_components(variant: str, stage: str) -> tuple[str, ...]:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if (variant, stage) not in TRAINABLE:
        raise ValueError(f"variant must be 'D', 'X' or 'H', got {variant!r}")
    return TRAINABLE[(variant, stage)]


def freeze_for_stage(model: nn.Module, stage: str) -> list[str]:
    """Set ``requires_grad`` for ``stage`` on an ``nvlm.NVLM``; returns the trainable parameters' names."""
    parts = trainable_components(model.config.variant, stage)
    trainable = []
    for name, param in model.named_parameters():
        param.requires_grad_(name.split(".", 1)[0] in parts)
        if param.requires_grad:
            trainable.append(name)
    return trainable
