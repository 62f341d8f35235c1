"""The zero-patch route: ``attn_implementation="nvlm"``, an attention function registered with
Hugging Face transformers' ``AttentionInterface``.

    from nvlm_kernels.integrations.transformers import register_nvlm_attention
    register_nvlm_attention()                                   # returns "nvlm"
    model = AutoModel.from_pretrained(path, attn_implementation="nvlm")
    model = InternVLForConditionalGeneration.from_pretrained(
        path, attn_implementation={"vision_config": "nvlm", "text_config": "sdpa"})   # per sub-config

Every attention module of a model whose config says ``"nvlm"`` calls ``attention_forward`` with
transformers' convention (that of ``integrations/sdpa_attention.py``): query [B, Hq, Sq, D], key and
value [B, Hkv, Skv, D], ``attention_mask`` (None or a 4-D mask), ``dropout``, ``scaling``,
``is_causal``; it returns (out [B, Sq, Hq, D], None). ``route`` decides, from shapes, dtypes and
flags only (never a tensor's values: no host sync, nothing that breaks ``torch.compile``):

* ``vit_attention`` (``nk.vit_attention`` on [B, S, H, D] views, no copies): non-causal
  self-attention, no mask, no dropout, Hq == Hkv, Sq == Skv -- the vision towers' attention
  (InternVL's ``InternVLVisionAttention``; other encoders' unmasked attention, e.g. Whisper's);
* ``gated_cross_attention`` (without a gate, every row attending every key: ranges [0, Skv) built
  on the device): non-causal attention without a mask whose key/value heads or length differ from
  the query's -- GQA, or cross-attention over an encoder's states (Whisper's decoder);
* SDPA (transformers' own ``sdpa_attention_forward``, the exact call ``attn_implementation="sdpa"``
  makes) for everything else: causal attention (text self-attention, prefill and decode: the
  module's ``is_causal``, as SDPA reads it), any mask tensor, dropout, a position bias, softcapping,
  sliding windows or attention sinks, ``output_attentions``, a head dim our kernels do not take (64,
  80, 96, 128), other dtypes.

A mask tensor always goes to SDPA: to serve it with our ops the function would have to read its
values (is it all-true? does each row see one contiguous range of keys?), one device-to-host copy
per layer. It rarely costs anything: the mask function registered under the same name (SDPA's own,
``sdpa_mask``) returns no mask at all where none is needed -- an encoder without padding, a causal
text model without padding (SDPA's ``is_causal``) -- after the one check per forward that SDPA's
route makes too. Mllama's cross-attention layers always carry their image mask, so this route
leaves them on SDPA; ``apply_nvlm_kernels_to_mllama`` turns that mask into key ranges.

What the route reaches, per family: InternVL -- every vision attention (``vit_attention``; the
q/k RMSNorm of QK-norm checkpoints still runs as transformers' own modules before the call), the
causal text model stays on SDPA; Mllama -- nothing (its vision encoder always passes the
aspect-ratio padding mask, its cross-attention layers the image mask, its text layers are causal);
NVLM-D's remote code -- nothing (its InternViT attention does not call the ``AttentionInterface``).
What only the patch (``apply_nvlm_kernels``) reaches: the fused QK-RMSNorm + attention
(``vit_qk_norm_attention``), the projector (CLS drop + pixel shuffle + LayerNorm + MLP in one
``mlp_projector``), Mllama's masked cross-attention and vision attention, and NVLM-D.

The ``"nvlm"`` mask entry is SDPA's mask function: text layers of a model on ``"nvlm"`` keep their
causal and padding masks exactly (without an entry transformers would build no mask at all).
"""

from __future__ import annotations

import torch
from torch import nn

NAME = "nvlm"

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HEAD_DIMS = (64, 80, 96, 128)  # what our Triton kernels take (vit_attention / gated_cross_attention)
# keyword arguments some models pass that SDPA handles (or ignores) its own way: the call stays on SDPA
_SDPA_ONLY = ("position_bias", "softcap", "sliding_window", "s_aux", "sinks", "output_attentions")

VIT = "vit_attention"
CROSS = "gated_cross_attention"


def register() -> str:
    """Register ``attention_forward`` and SDPA's mask function under ``"nvlm"`` (idempotent);
    returns ``"nvlm"`` for ``attn_implementation``."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as exc:
        raise ImportError("register_nvlm_attention needs Hugging Face transformers (pip install transformers)") from exc
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def route(
    module: nn.Module | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[str, str]:
    """(what serves this call: ``"vit_attention"``, ``"gated_cross_attention"`` or ``"sdpa"``, why).
    Reads shapes, dtypes and flags only."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if causal:  # SDPA's own reading: a module without is_causal is causal
        return "sdpa", "causal attention (text self-attention): SDPA's is_causal or mask path"
    if attention_mask is not None:
        return "sdpa", "a mask tensor (serving it with our ops would read its values: a host sync per layer)"
    if dropout:
        return "sdpa", f"attention dropout {dropout} (our ops have none)"
    for name in _SDPA_ONLY:
        given = kwargs.get(name)
        if given is not None and given is not False:
            return "sdpa", f"{name} is set (SDPA's handling kept)"
    tensors = (query, key, value)
    if any(not isinstance(t, torch.Tensor) or t.dim() != 4 for t in tensors):
        return "sdpa", "query, key and value are not all 4-D tensors [B, H, S, D]"
    if query.dtype not in _DTYPES or not (query.dtype == key.dtype == value.dtype):
        return "sdpa", f"dtypes {query.dtype}, {key.dtype}, {value.dtype} (ours: one of {_DTYPES})"
    if not (query.device == key.device == value.device):
        return "sdpa", "query, key and value on different devices"
    (b, hq, sq, d), (bk, hkv, skv, dk) = query.shape, key.shape
    if key.shape != value.shape or bk != b or dk != d:
        return "sdpa", f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)} do not pair up"
    if d not in _HEAD_DIMS:
        return "sdpa", f"head dim {d} (our kernels take {_HEAD_DIMS})"
    if sq == 0 or skv == 0 or b == 0:
        return "sdpa", "an empty query or key sequence"
    if hq % hkv:
        return "sdpa", f"{hq} query heads are not a multiple of {hkv} key/value heads"
    if hq == hkv and sq == skv:
        return VIT, "non-causal self-attention without a mask"
    return CROSS, "non-causal attention without a mask over other keys (cross-attention or GQA)"


def _full_ranges(batch: int, sq: int, skv: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """kv ranges [0, skv) for every row, int32 [B, Sq], made on the device (no host sync) and marked
    well formed so gated_cross_attention does not check their values."""
    from nvlm_kernels.cross_attention.ranges import mark_trusted

    start = torch.zeros(batch, sq, dtype=torch.int32, device=device)
    end = torch.full((batch, sq), skv, dtype=torch.int32, device=device)
    mark_trusted(start, end)
    return start, end


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function convention (``sdpa_attention_forward``'s): query [B, Hq, Sq, D],
    key/value [B, Hkv, Skv, D] -> (out [B, Sq, Hq, D] contiguous, None)."""
    op, _ = route(module, query, key, value, attention_mask, dropout, is_causal, **kwargs)
    if op == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )

    import nvlm_kernels as nk

    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, S, H, D] views
    if op == VIT:
        return nk.vit_attention(q, k, v, softmax_scale=scaling), None
    start, end = _full_ranges(q.shape[0], q.shape[1], k.shape[1], q.device)
    return nk.gated_cross_attention(q, k, v, start, end, softmax_scale=scaling), None
