"""Hugging Face Mllama (Llama-3.2-Vision) on our ops: ``apply_nvlm_kernels_to_mllama``.

What changes (``transformers.models.mllama.modeling_mllama``; parameters, names and the model's own
structure stay: the tanh gates are still applied by ``MllamaCrossAttentionDecoderLayer``):

* ``MllamaTextCrossAttention.forward`` runs ``nvlm_kernels.gated_cross_attention``. The processor's
  ``cross_attention_mask`` [B, S, images, max_tiles] becomes per-row key ranges where it enters the
  model: ``MllamaModel.forward`` is wrapped so that Hugging Face's own forward runs without the mask
  (``_prepare_cross_attention_mask`` never builds the dense [B, 1, S, images·max_tiles·1601] mask)
  and the ranges reach the text model instead (``MllamaTextModel.forward`` is wrapped to take
  them). Tiles no text row sees (the padding tiles of images with fewer than max_tiles tiles, and
  padding images) leave the key sequence: the vision states are gathered once per forward, before
  the cross-attention layers project them, so that the tiles of a group of images (adjacent
  ``<|image|>`` tokens) form one contiguous range (``ranges_from_tile_mask``). The key/value cache
  holds the compacted keys; every decoding step recomputes the same layout from the whole mask
  (``generate`` appends each new token's row as a copy of the last one, the processor's rule).
* ``MllamaVisionAttention.forward``: Hugging Face's aspect-ratio mask lets every real patch attend
  to every position (padding patches and padding tiles included) and a padding position (the 7
  patches that pad each tile's 1601 to 1608, and padding tiles) only to real positions. A call with
  that mask runs ``gated_cross_attention`` with each image's keys reordered real positions first
  (one gather of k and v per layer), so that real rows see all keys and padding rows the first
  ``n_real``: the same attention. A call whose mask masks nothing (all zeros: no padding position)
  runs ``vit_attention``. In practice every call of Hugging Face's vision encoder has padding
  patches (1601 is not a multiple of 8), so it is the first form; a call without a mask, an image
  with no real tile (an all-zero ``aspect_ratio_mask`` row, which the processor never makes: tile 0
  is always real) or any other mask runs Hugging Face's forward. The plan is made once per mask
  (every layer of both encoders shares it).

Text before the first image (``strict_image_masking``). Hugging Face's masking gives a text row that
sees no tile (text before the first ``<|image|>``, left padding) a mask row of zeros, so that row
attends to *every* image key, padding tiles included, and only the cross-attention layer's MLP
branch is zeroed (``full_text_row_masked_out_mask``): the attention branch reaches the residual
stream (huggingface/transformers#39379, with #34280; the fixes proposed there, e.g. PR #47103, zero
both branches as Meta's reference implementation does). For ``"Describe <|image|> in one word"``
the rows of ``Describe`` attend to the image in Hugging Face's model:

* ``strict_image_masking=False`` (default, parity): the same, so the patched model's outputs equal
  Hugging Face's (all tiles stay in the key sequence then, unseen ones after the seen ones);
* ``strict_image_masking=True`` (Meta's semantics): those rows' cross-attention output is exactly 0
  (an empty range), so ``Describe``'s hidden states are exactly those of the text alone.

Other masks (a row whose tiles are not contiguous even after compaction), and training with
cross-attention dropout, run Hugging Face's code (a warning says why, once); so do calls without a
mask (Hugging Face's attention then depends on ``attn_implementation``: SDPA treats an unmasked
Mllama attention as causal, eager as full). Under autocast the attention computes in the autocast
dtype, as SDPA does. The attention weights are not returned (None, as with SDPA); with
``output_attentions`` a parity-mode forward runs Hugging Face's text side (its weights, exactly), a
strict one warns that the cross-attention weights are missing. The patch adds one device->host
transfer to a prefill (the text layout) plus one for the vision plan, and one to a decoding step.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import sys
import warnings

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

import nvlm_kernels as nk
from nvlm_kernels.cross_attention.ranges import mark_trusted, ranges_from_tile_mask
from nvlm_kernels.integrations.transformers._patching import (
    PatchReport,
    class_patches,
    patch_class,
    patch_method,
    reject_options,
    unpatched_attribute,
)

FAMILY = "Mllama"
OPTIONS = ("cross_attention", "vision_attention", "strict_image_masking")
_DEFAULTS = {"cross_attention": True, "vision_attention": True, "strict_image_masking": False}
_MODULE = "transformers.models.mllama.modeling_mllama"


def _modeling():
    try:
        import transformers.models.mllama.modeling_mllama as modeling
    except ImportError as error:  # pragma: no cover - the package's tests skip without transformers
        raise ImportError("apply_nvlm_kernels_to_mllama needs transformers (pip install transformers)") from error
    return modeling


def matches(model: nn.Module) -> bool:
    modeling = sys.modules.get(_MODULE)  # an Mllama model exists only once its module is imported
    return modeling is not None and isinstance(model, (modeling.MllamaForConditionalGeneration, modeling.MllamaModel))


def classes() -> tuple[type, ...]:
    m = _modeling()
    return (m.MllamaModel, m.MllamaTextModel, m.MllamaTextCrossAttention, m.MllamaVisionAttention)


@functools.cache
def _signature(function) -> inspect.Signature:
    return inspect.signature(function)


def _bind(function, module, args, kwargs) -> dict:
    """``function(module, *args, **kwargs)``'s arguments by name (``module`` not among them)."""
    signature = _signature(function)
    arguments = dict(signature.bind(module, *args, **kwargs).arguments)
    arguments.pop(next(iter(signature.parameters)))
    for name, parameter in signature.parameters.items():  # **kwargs merged in (the model's forwards have no *args)
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    return arguments


def _warn(message: str) -> None:
    warnings.warn(f"nvlm_kernels (Mllama): {message}; running Hugging Face's code for this call", stacklevel=3)


def _warn_once(message: str) -> None:
    warnings.warn(f"nvlm_kernels (Mllama): {message}", stacklevel=3)


# --------------------------------------------------------------------------------------------------
# the text side: the mask becomes ranges in MllamaModel.forward, the text model takes them


@dataclasses.dataclass(frozen=True)
class CrossAttentionRanges:
    """What the patched ``MllamaTextCrossAttention`` receives in place of the dense mask: int32
    [B, S] key ranges over the compacted vision keys of the current text rows."""

    kv_start: torch.Tensor
    kv_end: torch.Tensor

    def dense_mask(self, num_keys: int, dtype: torch.dtype) -> torch.Tensor:
        """The additive [B, 1, S, num_keys] mask of these ranges (for Hugging Face's code)."""
        keys = torch.arange(num_keys, device=self.kv_start.device)
        inside = (keys >= self.kv_start[..., None]) & (keys < self.kv_end[..., None])
        return torch.zeros(inside.shape, dtype=dtype, device=inside.device).masked_fill(
            ~inside, torch.finfo(dtype).min
        )[:, None]


@dataclasses.dataclass(frozen=True)
class _TextLayout:
    owner: nn.Module  # the MllamaTextModel that takes it
    ranges: CrossAttentionRanges
    row_mask: torch.Tensor  # Hugging Face's full_text_row_masked_out_mask [B, 1, S, 1] of the current rows
    tile_index: torch.Tensor | None  # [B, num_tiles]: the tiles the keys keep (None: the first num_tiles)
    num_tiles: int
    total_tiles: int  # images · max_tiles
    tokens_per_tile: int  # the vision tokens per tile (1601)
    batch: int

    def gather(self, states: torch.Tensor) -> torch.Tensor:
        """The vision states [B, images·max_tiles·P, H] (or Hugging Face's [B·images·max_tiles, P,
        H]) of the kept tiles, in the compacted order: [B, num_tiles·P, H]."""
        b, j, p = self.batch, self.total_tiles, self.tokens_per_tile
        if states.dim() < 2 or states.numel() != b * j * p * states.shape[-1]:
            raise ValueError(
                f"cross_attention_states {tuple(states.shape)} do not hold the {b}·{j}·{p} vision tokens "
                f"(batch · images·max_tiles · tokens per tile) that cross_attention_mask describes"
            )
        if self.tile_index is None:
            if self.num_tiles == j:
                return states
            return states.reshape(b, j * p, -1)[:, : self.num_tiles * p]
        tiles = states.reshape(b, j, p, -1)
        rows = torch.arange(b, device=states.device)[:, None]
        return tiles[rows, self.tile_index.to(states.device)].reshape(b, self.num_tiles * p, -1)


# the layout MllamaModel.forward computed, waiting for its text model (only inside that call)
_PENDING: contextvars.ContextVar[_TextLayout | None] = contextvars.ContextVar("nvlm_mllama_layout", default=None)


def _text_layout(model: nn.Module, mask, past_key_values, seq_len: int, strict: bool) -> _TextLayout | None:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return None  # Hugging Face's code says what is wrong with it
    batch, length, images, max_tiles = mask.shape
    first = past_key_values.get_seq_length() if past_key_values is not None else 0
    if first + seq_len > length:
        raise ValueError(
            f"cross_attention_mask covers {length} text positions, but this call's tokens reach position "
            f"{first + seq_len} (pass the whole mask, as generate() does)"
        )
    dtype = model.dtype
    # visible exactly where Hugging Face's _prepare_cross_attention_mask leaves 0 (not finfo.min)
    visible = ((1.0 - mask).to(dtype) == 0).reshape(batch, length, images * max_tiles)
    tokens_per_tile = model.vision_model.num_patches
    try:
        tiles = ranges_from_tile_mask(
            visible,
            tokens_per_tile,
            rows_without_tiles="empty" if strict else "all",
            rows=slice(first, first + seq_len),
        )
    except ValueError as error:
        _warn(f"cross_attention_mask is not one key range per text row ({error})")
        return None
    return _TextLayout(
        owner=model.language_model,
        ranges=CrossAttentionRanges(tiles.kv_start, tiles.kv_end),
        row_mask=tiles.row_has_tiles.to(dtype)[:, None, :, None],
        tile_index=tiles.tile_index,
        num_tiles=tiles.num_tiles,
        total_tiles=images * max_tiles,
        tokens_per_tile=tokens_per_tile,
        batch=batch,
    )


def _model_forward(self, strict: bool, args, kwargs):
    original = unpatched_attribute(type(self), "forward")
    arguments = _bind(original, self, args, kwargs)  # called by keyword: Hugging Face's decorators expect it
    mask = arguments.get("cross_attention_mask")
    tokens = arguments.get("input_ids")
    tokens = arguments.get("inputs_embeds") if tokens is None else tokens
    layout = None
    weights = arguments.get("output_attentions", getattr(self.config, "output_attentions", False))
    if weights and strict:
        _warn_once("output_attentions: the cross-attention layers' weights are not returned (strict masking)")
    if mask is not None and tokens is not None and (strict or not weights):  # parity + weights: HF's code
        layout = _text_layout(self, mask, arguments.get("past_key_values"), tokens.shape[1], strict)
    if layout is None:
        return original(self, *args, **kwargs)
    arguments["cross_attention_mask"] = None  # Hugging Face's forward builds no mask; the text model gets the ranges
    token = _PENDING.set(layout)
    try:
        return original(self, **arguments)
    finally:
        _PENDING.reset(token)


def _model_forward_parity(self, *args, **kwargs):
    """MllamaModel.forward with the cross-attention mask as key ranges (Hugging Face's semantics)."""
    return _model_forward(self, False, args, kwargs)


def _model_forward_strict(self, *args, **kwargs):
    """MllamaModel.forward with the cross-attention mask as key ranges (Meta's semantics: text that
    sees no image gets no cross-attention)."""
    return _model_forward(self, True, args, kwargs)


def _text_model_forward(self, *args, **kwargs):
    """MllamaTextModel.forward taking the layout its MllamaModel prepared: the ranges in place of the
    cross-attention mask, the kept tiles' vision states."""
    original = unpatched_attribute(type(self), "forward")
    layout = _PENDING.get()
    if layout is None or layout.owner is not self:
        return original(self, *args, **kwargs)
    arguments = _bind(original, self, args, kwargs)
    states = arguments.get("cross_attention_states")
    if states is not None:
        arguments["cross_attention_states"] = layout.gather(states)
    arguments["cross_attention_mask"] = layout.ranges
    arguments["full_text_row_masked_out_mask"] = layout.row_mask
    token = _PENDING.set(None)  # taken
    try:
        return original(self, **arguments)
    finally:
        _PENDING.reset(token)


def _cross_attention_forward(
    self,
    hidden_states: torch.Tensor,
    cross_attention_states: torch.Tensor | None = None,
    past_key_values=None,
    attention_mask=None,
    use_cache: bool | None = None,
    **kwargs,
):
    """MllamaTextCrossAttention.forward on gated_cross_attention (q/k RMSNorm, GQA and the key/value
    cache as Hugging Face's; the layer applies tanh(gate))."""
    original = unpatched_attribute(type(self), "forward")
    if not isinstance(attention_mask, CrossAttentionRanges):
        # a dense mask (the text model called without our MllamaModel wrapper, or a mask left to HF), or
        # none: then HF's attention depends on attn_implementation (SDPA makes it causal over the keys)
        return original(
            self, hidden_states, cross_attention_states, past_key_values, attention_mask, use_cache, **kwargs
        )
    bsz, q_len, _ = hidden_states.shape
    if self.training and self.dropout:  # our op has no dropout: Hugging Face's code on the ranges' dense mask
        _warn(f"cross-attention dropout {self.dropout} in training")
        return _cross_attention_dense(self, original, hidden_states, cross_attention_states, past_key_values,
                                      attention_mask, use_cache, kwargs)  # fmt: skip
    query = self.q_norm(self.q_proj(hidden_states).view(bsz, q_len, self.num_heads, self.head_dim))
    if cross_attention_states is not None:
        key = self.k_proj(cross_attention_states).view(bsz, -1, self.num_key_value_heads, self.head_dim)
        value = self.v_proj(cross_attention_states).view(bsz, -1, self.num_key_value_heads, self.head_dim)
        key = self.k_norm(key)
        if past_key_values is not None:
            if past_key_values.get_seq_length(self.layer_idx):
                raise NotImplementedError(
                    "nvlm_kernels (Mllama): new images for a cache that already holds image keys; the key ranges "
                    "cover one set of images (revert_nvlm_kernels(model) to run Hugging Face's code)"
                )
            keys, values = past_key_values.update(key.transpose(1, 2), value.transpose(1, 2), self.layer_idx)
            key, value = keys.transpose(1, 2), values.transpose(1, 2)
    elif past_key_values is not None and past_key_values.get_seq_length() > 0:
        layer = past_key_values.layers[self.layer_idx]
        key, value = layer.keys.transpose(1, 2), layer.values.transpose(1, 2)
    else:
        raise ValueError(
            "Cross attention layer can't find neither `cross_attn_states` nor cached values for key/values!"
        )
    query, key, value = _autocast(query, key, value)
    out = nk.gated_cross_attention(
        query, key, value, attention_mask.kv_start, attention_mask.kv_end, softmax_scale=self.scaling
    )
    return self.o_proj(out.reshape(bsz, q_len, -1)), None


def _autocast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast, the dtype SDPA would compute in (the q/k RMSNorms return float32 there)."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


def _cross_attention_dense(self, original, hidden_states, states, past_key_values, ranges, use_cache, kwargs):
    if states is not None:
        num_keys = states.shape[0] * states.shape[1] // hidden_states.shape[0]
    else:
        num_keys = past_key_values.layers[self.layer_idx].keys.shape[-2]
    mask = ranges.dense_mask(num_keys, hidden_states.dtype)
    out, weights = original(self, hidden_states, states, past_key_values, mask, use_cache, **kwargs)
    # an empty range is exactly 0 (Hugging Face would average every key)
    return out * (ranges.kv_end > ranges.kv_start)[..., None].to(out.dtype), weights


# --------------------------------------------------------------------------------------------------
# the vision side


@dataclasses.dataclass(frozen=True)
class _VisionPlan:
    key_order: torch.Tensor | None  # [B, N]: real positions first; None: no padding (vit_attention)
    kv_start: torch.Tensor | None
    kv_end: torch.Tensor | None


_NO_PADDING = _VisionPlan(None, None, None)
# (No mask at all is left to Hugging Face: its SDPA path then makes the vision attention causal.)
_VISION_PLANS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # mask -> (its version, plan or None)


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


@torch.no_grad()
def _vision_plan(mask, batch: int, length: int) -> _VisionPlan | None:
    """How to run a vision attention call with this mask (None: Hugging Face's code). Computed once
    per mask tensor (every layer of both encoders gets the same one), in one transfer."""
    if not isinstance(mask, torch.Tensor) or not mask.is_floating_point() or mask.shape != (batch, 1, length, length):
        return None
    cached = _VISION_PLANS.get(mask)
    if cached is not None and cached[0] == _version(mask):
        return cached[1]
    m = mask[:, 0]
    pad = m.diagonal(dim1=1, dim2=2) != 0  # a padding position masks itself
    both = pad[:, :, None] & pad[:, None, :]
    # Hugging Face's aspect-ratio mask: finfo.min exactly where row and column are both padding, else 0
    exact = torch.where(both, m == torch.finfo(m.dtype).min, m == 0).all()
    real = (~pad).sum(1)
    flags = torch.stack([exact, pad.any(), ((real == 0) & pad.any(1)).any()]).tolist()  # the one transfer
    is_exact, any_padding, image_without_real = flags
    if not is_exact or image_without_real:
        plan = None  # another mask, or a fully masked row (Hugging Face averages every value there)
        _warn("the vision attention mask is not Mllama's aspect-ratio mask with a real tile per image")
    elif not any_padding:
        plan = _NO_PADDING
    else:
        key_order = torch.sort(pad.to(torch.uint8), dim=1, stable=True).indices
        start = torch.zeros(batch, length, dtype=torch.int32, device=mask.device)
        end = torch.where(pad, real[:, None], length).to(torch.int32)
        mark_trusted(start, end)
        plan = _VisionPlan(key_order, start, end)
    _VISION_PLANS[mask] = (_version(mask), plan)
    return plan


def _vision_attention_forward(self, hidden_states: torch.Tensor | None = None, attention_mask=None, **kwargs):
    """MllamaVisionAttention.forward on vit_attention (no padding) or gated_cross_attention (padding)."""
    original = unpatched_attribute(type(self), "forward")
    if hidden_states is None or kwargs or hidden_states.dim() != 3:
        args = () if hidden_states is None else (hidden_states,)
        return original(self, *args, attention_mask=attention_mask, **kwargs)
    batch, length, _ = hidden_states.shape
    plan = _vision_plan(attention_mask, batch, length)
    if plan is None:
        return original(self, hidden_states, attention_mask=attention_mask)
    shape = (batch, length, self.num_heads, self.head_dim)
    query = self.q_proj(hidden_states).view(shape)
    key = self.k_proj(hidden_states).view(shape)
    value = self.v_proj(hidden_states).view(shape)
    query, key, value = _autocast(query, key, value)
    if plan.key_order is None:
        out = nk.vit_attention(query, key, value, softmax_scale=self.scaling)
    else:
        rows = torch.arange(batch, device=key.device)[:, None]
        key, value = key[rows, plan.key_order], value[rows, plan.key_order]
        out = nk.gated_cross_attention(query, key, value, plan.kv_start, plan.kv_end, softmax_scale=self.scaling)
    return self.o_proj(out.reshape(batch, length, -1)), None


# --------------------------------------------------------------------------------------------------
# apply


def _targets(options: dict) -> list[tuple[type, object, str]]:
    """(class, replacement forward, what runs now) for the options."""
    m = _modeling()
    targets = []
    if options["cross_attention"]:
        strict = options["strict_image_masking"]
        semantics = "strict (Meta)" if strict else "parity (Hugging Face)"
        targets += [
            (m.MllamaModel, _model_forward_strict if strict else _model_forward_parity,
             f"cross_attention_mask as key ranges, {semantics} masking of text before the first image"),
            (m.MllamaTextModel, _text_model_forward, "takes the key ranges and the kept tiles' vision states"),
            (m.MllamaTextCrossAttention, _cross_attention_forward, "nvlm_kernels.gated_cross_attention"),
        ]  # fmt: skip
    if options["vision_attention"]:
        targets.append(
            (m.MllamaVisionAttention, _vision_attention_forward,
             "nvlm_kernels.vit_attention / gated_cross_attention (aspect-ratio padding as key ranges)")
        )  # fmt: skip
    return targets


def _check_semantics(current, wanted, where: str) -> None:
    """Patching again with the other strict_image_masking is an error (revert first), not ignored."""
    current = getattr(current, "__func__", current)
    other = {_model_forward_parity: _model_forward_strict, _model_forward_strict: _model_forward_parity}
    if current is not None and other.get(wanted) is current:
        raise ValueError(
            f"apply_nvlm_kernels_to_mllama: {where} is already patched with strict_image_masking="
            f"{current is _model_forward_strict}; revert_nvlm_kernels first to change it"
        )


def apply(model: nn.Module | None = None, **options) -> PatchReport:
    """Patch ``model`` (an ``MllamaForConditionalGeneration`` or ``MllamaModel``: this instance only), or
    with ``model=None`` the Mllama classes (every model). Options: ``cross_attention``,
    ``vision_attention``, ``strict_image_masking`` (module docstring)."""
    reject_options(FAMILY, options, OPTIONS)
    options = {**_DEFAULTS, **options}
    for name, value in options.items():
        if not isinstance(value, bool):
            raise TypeError(f"apply_nvlm_kernels_to_mllama: {name} must be a bool, got {value!r}")
    if options["strict_image_masking"] and not options["cross_attention"]:
        raise ValueError("apply_nvlm_kernels_to_mllama: strict_image_masking=True needs cross_attention=True")
    targets = _targets(options)
    if model is None:
        report = PatchReport("Mllama classes (class level: every Mllama model)")
        patched = set(class_patches())
        for cls, replacement, what in targets:
            if (cls, "forward") in patched:
                _check_semantics(cls.__dict__.get("forward"), replacement, f"{cls.__name__}.forward (class level)")
            patch_class(cls, "forward", replacement, report, what)
    else:
        if not matches(model):
            raise TypeError(
                f"apply_nvlm_kernels_to_mllama: {type(model).__module__}.{type(model).__name__} is not an Mllama "
                "model (MllamaForConditionalGeneration or MllamaModel)"
            )
        report = PatchReport(f"{type(model).__name__} (this instance)")
        for path, module in model.named_modules():
            for cls, replacement, what in targets:
                if isinstance(module, cls):
                    where = path or type(model).__name__
                    _check_semantics(module.__dict__.get("forward"), replacement, where)
                    patch_method(module, "forward", replacement, report, where, what)
    for name in ("cross_attention", "vision_attention"):
        if not options[name]:
            report.unchanged.append(f"{name.replace('_', ' ')}: left to Hugging Face ({name}=False)")
    return report
