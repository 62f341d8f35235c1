"""``Qwen2Decoder``: the Qwen2-style language model of NVLM-1.0 (spec §8.1), with a ``KVCache``.

Plain modules in the gpt-fast style: RMSNorm, rotary position embeddings (Hugging Face Qwen2's
rotate-half convention; its dynamic NTK scaling beyond ``max_position_embeddings`` when the config
asks for it), grouped-query causal self-attention through
``torch.nn.functional.scaled_dot_product_attention``, SwiGLU. Parameter names are those of Hugging
Face's ``Qwen2ForCausalLM`` without the ``model.`` prefix, so its state dict loads after stripping
that prefix.

``forward`` takes embeddings, not token ids, because NVLM-D / NVLM-H splice image embeddings into the
text embeddings first, and a ``before_layer(i, h)`` hook, which is how NVLM-X / NVLM-H insert their
gated cross-attention blocks (spec §6.3: *before* selected layers) without this module knowing them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nvlm.config import LLMConfig
from nvlm.layers import RMSNorm
from nvlm.parallel import (
    TPGroup,
    copy_to_tp,
    gather_from_tp,
    kv_heads,
    kv_projection,
    make_swiglu,
    query_heads,
    reduce_from_tp,
)
from nvlm_kernels import _nvtx

INIT_STD = 0.02


class KVCache:
    """Preallocated keys and values of every layer, ``k[i]``, ``v[i]`` [B, max_len, Hkv, D], and
    ``length``: how many positions are filled. A decoder forward writes its new keys/values at
    ``length`` and then advances it by the number of new tokens."""

    def __init__(
        self, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int, *, device=None, dtype=None
    ) -> None:
        shape = (batch, max_len, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.batch, self.max_len, self.length = batch, max_len, 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new k, v [B, S, Hkv, D] at ``length``; return all keys/values so far (views)."""
        end = self.length + k.shape[1]
        self.k[layer][:, self.length : end] = k
        self.v[layer][:, self.length : end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def reset(self) -> None:
        self.length = 0


def rotary_inverse_frequencies(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """1/θ^(2i/D), i < D/2, in float32: Hugging Face Qwen2's default RoPE frequencies."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))


def dynamic_ntk_inverse_frequencies(
    position_ids: torch.Tensor, head_dim: int, theta: float, factor: float, max_position_embeddings: int
) -> torch.Tensor:
    """Hugging Face's dynamic NTK RoPE (``rope_scaling={"type": "dynamic", "factor": ...}``,
    ``_compute_dynamic_ntk_parameters``) for a forward whose longest position is
    ``max(position_ids)``: with L = max(position_ids) + 1 > max_position_embeddings (M) the base
    becomes θ · (factor · L / M − (factor − 1))^(D / (D − 2)); up to M the frequencies are the
    unscaled ones, exactly. The same float32 operations as transformers, computed on the device
    (no host sync; both branches are D/2 values).

    Hugging Face's rotary module keeps state (``max_seq_len_cached``): it rescales when a forward
    reaches past the longest length it has seen and resets only below M. This function is that
    module's answer for every forward of a fresh module whose lengths grow, as in generation (a
    prefill of L, then decoding steps at L, L + 1, ...: each new token's keys are rotated with the
    base of its own step and the cached ones keep theirs, as in transformers' KV cache). It
    differs only after a longer forward followed by a shorter one that is still past M, where
    transformers keeps the larger base."""
    device = position_ids.device
    longest = position_ids.max() + 1
    seq_len = torch.maximum(longest, torch.tensor(max_position_embeddings, dtype=longest.dtype, device=device))
    base = theta * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).to(dtype=torch.float) / head_dim
    scaled = 1.0 / (base**exponents)
    return torch.where(longest > max_position_embeddings, scaled, rotary_inverse_frequencies(head_dim, theta, device))


def rotary_cos_sin(
    position_ids: torch.Tensor,
    head_dim: int,
    theta: float,
    *,
    dynamic_factor: float | None = None,
    max_position_embeddings: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, S, D] in float32, as Hugging Face Qwen2 computes them: inv_freq = 1/θ^(2i/D) and
    the angles both in float32 (in bfloat16 the angles of late positions would be far off), the
    frequencies repeated over the two halves of the head (the rotate-half layout).

    ``dynamic_factor`` (with ``max_position_embeddings``): dynamic NTK scaling beyond
    ``max_position_embeddings`` (``dynamic_ntk_inverse_frequencies``)."""
    if dynamic_factor is None:
        inv_freq = rotary_inverse_frequencies(head_dim, theta, position_ids.device)
    else:
        if max_position_embeddings is None:
            raise ValueError("dynamic RoPE scaling needs max_position_embeddings")
        inv_freq = dynamic_ntk_inverse_frequencies(
            position_ids, head_dim, theta, dynamic_factor, max_position_embeddings
        )
    angles = position_ids.float()[..., None] * inv_freq  # [B, S, D/2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D]; cos, sin [B, S, D] (float32), cast to x's dtype first as Hugging Face does."""
    cos, sin = cos.to(x.dtype).unsqueeze(2), sin.to(x.dtype).unsqueeze(2)
    return x * cos + rotate_half(x) * sin


class SelfAttention(nn.Module):
    """Grouped-query self-attention; under tensor parallelism (``tp``) this rank's query heads and the
    kv heads they use (``nvlm.parallel``), with o_proj row-parallel."""

    def __init__(self, config: LLMConfig, *, device=None, dtype=None, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.tp = tp
        self.kv_heads = kv_heads(config.num_heads, config.num_kv_heads, tp)
        self.num_heads, self.num_kv_heads = query_heads(config.num_heads, tp)[1], self.kv_heads.count
        self.head_dim = config.head_dim
        kw = {"device": device, "dtype": dtype}
        hidden = config.hidden_size
        q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden, q_width, bias=config.qkv_bias, **kw)
        self.k_proj = nn.Linear(hidden, kv_width, bias=config.qkv_bias, **kw)
        self.v_proj = nn.Linear(hidden, kv_width, bias=config.qkv_bias, **kw)
        self.o_proj = nn.Linear(q_width, hidden, bias=False, **kw)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
        layer_index: int,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        x = copy_to_tp(x, self.tp)
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim)
        k = kv_projection(self.k_proj, x, self.kv_heads).view(batch, seq, self.num_kv_heads, self.head_dim)
        v = kv_projection(self.v_proj, x, self.kv_heads).view(batch, seq, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.write(layer_index, k, v)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=is_causal,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return reduce_from_tp(self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1)), self.tp)


class DecoderLayer(nn.Module):
    def __init__(self, config: LLMConfig, *, device=None, dtype=None, tp: TPGroup | None = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.self_attn = SelfAttention(config, **kw, tp=tp)
        self.mlp = make_swiglu(config.hidden_size, config.intermediate_size, tp, **kw)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_eps, **kw)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_eps, **kw)

    def forward(self, h, rope, mask, is_causal, cache, layer_index) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), rope, mask, is_causal, cache, layer_index)
        return h + self.mlp(self.post_attention_layernorm(h))


def attention_mask_for(
    attention_mask: torch.Tensor | None, past: int, seq: int, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """(mask for scaled_dot_product_attention, is_causal) for ``seq`` queries at positions
    past..past+seq-1 over keys 0..past+seq-1. A boolean mask is True where a query may attend.

    A query row whose every key is masked (a left-padding token: its own key is padding and so is
    everything before it) would make softmax return NaN; such a row attends to its own key instead.
    Rows with a real key keep exactly the causal ∧ key-padding mask, as Hugging Face's."""
    if attention_mask is None:
        if past == 0:
            return None, True  # the kernels' own causal mask, no tensor needed
        if seq == 1:
            return None, False  # one new token sees every cached key
    total = past + seq
    query_pos = torch.arange(past, total, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    allowed = key_pos <= query_pos  # [S, T]
    if attention_mask is None:
        return allowed, False
    allowed = allowed & attention_mask.to(device=device, dtype=torch.bool)[:, None, :]  # [B, S, T]
    no_key = ~allowed.any(-1, keepdim=True)
    allowed = allowed | (no_key & (key_pos == query_pos))
    return allowed[:, None], False  # [B, 1, S, T]: the same for every head


class Qwen2Decoder(nn.Module):
    """Embedding, ``num_layers`` decoder layers, final RMSNorm and the LM head (Qwen2ForCausalLM).
    Under tensor parallelism (``tp``) the embedding and the head hold this rank's vocabulary rows."""

    def __init__(self, config: LLMConfig, *, device=None, dtype=None, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.config = config
        self.tp = tp
        kw = {"device": device, "dtype": dtype}
        self.vocab_start, vocab_end = (tp or TPGroup()).chunk(config.vocab_size)
        local_vocab = vocab_end - self.vocab_start
        self.embed_tokens = nn.Embedding(local_vocab, config.hidden_size, **kw)
        self.layers = nn.ModuleList(DecoderLayer(config, **kw, tp=tp) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_eps, **kw)
        self.lm_head = nn.Linear(config.hidden_size, local_vocab, bias=False, **kw)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._layer_labels = [f"nvlm.llm.layer[{i}]" for i in range(config.num_layers)]  # built once: NVTX is hot
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Hugging Face Qwen2's init: normal(0, 0.02) weights of linears and embeddings, zero biases,
        unit norms. (On the meta device these are no-ops.)"""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, INIT_STD)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def new_cache(self, batch: int, max_len: int, *, device=None, dtype=None) -> KVCache:
        """An empty cache for ``batch`` sequences of up to ``max_len`` positions, on the model's device
        and in its dtype unless told otherwise."""
        weight = self.embed_tokens.weight
        c = self.config
        return KVCache(
            c.num_layers, batch, max_len, self.layers[0].self_attn.num_kv_heads if c.num_layers else 0, c.head_dim,
            device=device if device is not None else weight.device, dtype=dtype if dtype is not None else weight.dtype,
        )  # fmt: skip

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None or not self.tp.parallel:
            return self.embed_tokens(input_ids)
        # vocabulary-parallel: look up the ids this rank holds, zeros elsewhere, sum over the ranks
        local_ids = input_ids - self.vocab_start
        elsewhere = (local_ids < 0) | (local_ids >= self.embed_tokens.num_embeddings)
        embeds = self.embed_tokens(local_ids.masked_fill(elsewhere, 0)).masked_fill(elsewhere.unsqueeze(-1), 0.0)
        return reduce_from_tp(embeds, self.tp)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, S, V] in the hidden's dtype (callers wanting float32 logits cast them). Under tensor
        parallelism each rank computes its vocabulary's columns and every rank gets all of them."""
        return gather_from_tp(self.lm_head(copy_to_tp(hidden, self.tp)), self.tp)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        before_layer: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Hidden states [B, S, H] after the final norm.

        Args:
            inputs_embeds: [B, S, H].
            position_ids: [B, S] rotary positions.
            attention_mask: bool [B, S_past + S], True for real tokens (padding is False); None: all real.
            cache: keys/values of the S_past earlier positions; the new ones are appended to it.
            before_layer: ``h = before_layer(i, h)`` runs before decoder layer i.
        """
        batch, seq, _ = inputs_embeds.shape
        if position_ids.shape != (batch, seq):
            raise ValueError(f"position_ids must have shape [B, S] = {(batch, seq)}, got {tuple(position_ids.shape)}")
        past = 0
        if cache is not None:
            past = cache.length
            if cache.batch != batch:
                raise ValueError(f"the cache holds {cache.batch} sequences, the input {batch}")
            if past + seq > cache.max_len:
                raise ValueError(
                    f"the KV cache has max_len {cache.max_len}: it holds {past} positions and cannot take {seq} more "
                    f"(length {past + seq})"
                )
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, past + seq):
            raise ValueError(
                f"attention_mask must have shape [B, S_past + S] = {(batch, past + seq)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        mask, is_causal = attention_mask_for(attention_mask, past, seq, inputs_embeds.device)
        c = self.config
        scaling = {}
        if c.rope_scaling == "dynamic":
            scaling = {"dynamic_factor": c.rope_scaling_factor, "max_position_embeddings": c.max_position_embeddings}
        rope = rotary_cos_sin(position_ids, c.head_dim, c.rope_theta, **scaling)
        h = inputs_embeds
        for i, layer in enumerate(self.layers):
            if before_layer is not None:  # outside the layer's range: a cross-attention block has its own
                h = before_layer(i, h)
            with _nvtx.range(self._layer_labels[i]):
                h = layer(h, rope, mask, is_causal, cache, i)
        if cache is not None:
            cache.length = past + seq  # only after every layer wrote at the old length
        return self.norm(h)
