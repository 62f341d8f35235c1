"""``GatedCrossAttentionBlock``: the NVLM-X / NVLM-H gated cross-attention block (spec §6.3).

Pre-norm, inserted *before* selected decoder layers (Flamingo / Llama-3-V style, spec §10):

    h ← h + tanh(attn_gate) · o_proj(XAttn(q_proj(attn_norm(h)), k_proj(img), v_proj(img), ranges))
    h ← h + tanh(ffn_gate) · (row_valid ⊙ mlp(ffn_norm(h)))            (when ``gated_ffn``)

Each text row attends to one contiguous range of image keys, [kv_start, kv_end), given by
``nk.cross_attention_ranges``; rows with an empty range (text before the first image, padding) see
no image and the block leaves them exactly unchanged: the attention kernel returns exact zeros for
them, o_proj has no bias, and the FFN output is zeroed by ``row_valid = kv_end > kv_start`` (Meta's
semantics, not Hugging Face Mllama's, which leaks the attention branch; spec §10.1). The gates start
at 0 (``gate_init``), so a fresh block is the identity and the pretrained LLM is undisturbed.
"""

from __future__ import annotations

import torch
from torch import nn

import nvlm_kernels as nk
from nvlm.config import CrossAttentionConfig, LLMConfig
from nvlm.layers import RMSNorm
from nvlm.parallel import TPGroup, copy_to_tp, kv_heads, kv_projection, make_swiglu, query_heads, reduce_from_tp
from nvlm_kernels import _nvtx

INIT_STD = 0.02


class GatedCrossAttentionBlock(nn.Module):
    """Text queries (hidden size of the LLM) attend to image keys/values (``kv_dim`` wide), GQA
    with ``xattn.num_heads`` / ``xattn.num_kv_heads`` heads (None: the LLM's) of ``llm.head_dim``."""

    def __init__(
        self,
        llm: LLMConfig,
        xattn: CrossAttentionConfig,
        kv_dim: int,
        *,
        index: int | None = None,
        device=None,
        dtype=None,
        tp: TPGroup | None = None,
    ) -> None:
        super().__init__()
        num_heads = xattn.num_heads if xattn.num_heads is not None else llm.num_heads
        num_kv_heads = xattn.num_kv_heads if xattn.num_kv_heads is not None else llm.num_kv_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"query heads ({num_heads}) must be a multiple of kv heads ({num_kv_heads})")
        # under tensor parallelism: this rank's query heads and the kv heads they use (nvlm.parallel)
        self.tp = tp
        self.kv_heads = kv_heads(num_heads, num_kv_heads, tp)
        self.num_heads, self.num_kv_heads = query_heads(num_heads, tp)[1], self.kv_heads.count
        self.head_dim = llm.head_dim
        self.gate_init = xattn.gate_init
        self.index = index
        self._label = f"nvlm.xattn.layer[{index}]" if index is not None else None
        kw = {"device": device, "dtype": dtype}
        hidden, q_width, kv_width = llm.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.attn_norm = RMSNorm(hidden, eps=llm.rms_eps, **kw)
        self.q_proj = nn.Linear(hidden, q_width, bias=False, **kw)
        self.k_proj = nn.Linear(kv_dim, kv_width, bias=False, **kw)
        self.v_proj = nn.Linear(kv_dim, kv_width, bias=False, **kw)
        self.o_proj = nn.Linear(q_width, hidden, bias=False, **kw)  # no bias: empty rows must stay exactly 0
        self.attn_gate = nn.Parameter(torch.empty(1, **kw))
        self.gated_ffn = xattn.gated_ffn
        if self.gated_ffn:
            self.ffn_norm = RMSNorm(hidden, eps=llm.rms_eps, **kw)
            self.mlp = make_swiglu(hidden, llm.intermediate_size, tp, **kw)
            self.ffn_gate = nn.Parameter(torch.empty(1, **kw))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """normal(0, 0.02) projections (as the decoder's), unit norms, gates at ``gate_init``."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, INIT_STD)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        self.attn_gate.fill_(self.gate_init)
        if self.gated_ffn:
            self.ffn_gate.fill_(self.gate_init)

    def project_kv(self, image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embeds [B, Nkv, kv_dim] -> (k, v), each [B, Nkv, Hkv, D]. Computed once per image
        and reused for every decoding step."""
        batch, num_kv, _ = image_embeds.shape
        image_embeds = copy_to_tp(image_embeds, self.tp)
        shape = (batch, num_kv, self.num_kv_heads, self.head_dim)
        k = kv_projection(self.k_proj, image_embeds, self.kv_heads).view(shape)
        v = kv_projection(self.v_proj, image_embeds, self.kv_heads).view(shape)
        return k, v

    def forward(
        self,
        h: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
        kv_start: torch.Tensor,
        kv_end: torch.Tensor,
    ) -> torch.Tensor:
        """h [B, S, H]; kv from ``project_kv``; kv_start, kv_end int32 [B, S] -> h [B, S, H]."""
        if self._label is None:
            return self._forward(h, kv, kv_start, kv_end)
        with _nvtx.range(self._label):
            return self._forward(h, kv, kv_start, kv_end)

    def _forward(self, h, kv, kv_start, kv_end) -> torch.Tensor:
        batch, seq, _ = h.shape
        k, v = kv
        q = self.q_proj(copy_to_tp(self.attn_norm(h), self.tp)).view(batch, seq, self.num_heads, self.head_dim)
        attn = nk.gated_cross_attention(q, k, v, kv_start, kv_end)
        # tanh(g)·o_proj(a) = o_proj(tanh(g)·a) since o_proj is linear without bias. The gate is applied
        # here rather than passed to the kernel (gate=): the gate's gradient is then plain autograd of
        # one multiply, and the kernel need not keep an extra ungated copy of its output for it.
        h = h + torch.tanh(self.attn_gate) * reduce_from_tp(self.o_proj(attn.reshape(batch, seq, -1)), self.tp)
        if self.gated_ffn:
            row_valid = (kv_end > kv_start).unsqueeze(-1)  # [B, S, 1]
            # where, not a multiply by 0/1: an inf in a row that sees no image still gives exactly 0
            ffn = torch.where(row_valid, self.mlp(self.ffn_norm(h)), 0.0)
            h = h + torch.tanh(self.ffn_gate) * ffn
        return h

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, index={self.index}"
