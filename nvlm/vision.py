"""``InternViT``: NVLM-1.0's vision encoder (InternViT-6B-448px-V1-5, or InternViT-300M) as plain modules.

Spec: ../shared/docs/nvlm-spec.md §3. Pixels [tiles, 3, 448, 448] -> 14-pixel patches embedded by a
convolution, a CLS token prepended, learned positions added, then pre-norm blocks
x += ls1 · Attn(norm1(x)); x += ls2 · MLP(norm2(x)), with no final norm. The attention core is one
``nvlm_kernels`` op: ``vit_qk_norm_attention`` (InternViT-6B's full-width QK-RMSNorm fused in) or
``vit_attention`` (300M, no QK norm).

Parameter names are those of InternVL's ``modeling_intern_vit.py`` (which the Hugging Face
NVLM-D-72B checkpoint uses under ``vision_model.``), so its state dict loads by name. NVLM's
checkpoint pads the 25 real heads with zero "dummy" heads (``VisionConfig.num_dummy_heads``, spec
§3.1); ``load_state_dict`` strips them after checking them (``check_dummy_heads``: the dummy v rows
and proj columns must be zero, nonzero dummy q / k rows only warn: they cannot change the output).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import nvlm_kernels as nk
from nvlm.config import VisionConfig
from nvlm.layers import RMSNorm
from nvlm.parallel import TPGroup, copy_to_tp, reduce_from_tp, sum_across_tp, vit_heads
from nvlm_kernels import _nvtx

INIT_STD = 0.02  # random-weight runs only; real weights come from a checkpoint


def _norm(config: VisionConfig, *, device=None, dtype=None) -> nn.Module:
    if config.norm == "rms":
        return RMSNorm(config.hidden_size, config.norm_eps, device=device, dtype=dtype)
    if config.norm == "layer":
        return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, device=device, dtype=dtype)
    raise ValueError(f"VisionConfig.norm must be 'rms' or 'layer', got {config.norm!r}")


class InternViTEmbeddings(nn.Module):
    """Conv patch embedding (with bias), CLS token, learned positions (InternVisionEmbeddings)."""

    def __init__(self, config: VisionConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        self.grid = config.grid
        width = config.hidden_size
        self.class_embedding = nn.Parameter(torch.empty(1, 1, width, device=device, dtype=dtype))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, width, kernel_size=config.patch_size, stride=config.patch_size,
            bias=True, device=device, dtype=dtype,
        )  # fmt: skip
        self.position_embedding = nn.Parameter(
            torch.empty(1, config.num_patches + 1, width, device=device, dtype=dtype)
        )

    def _patch_positions(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Positions of the patches for a grid_h × grid_w grid. InternVL resamples the trained grid
        bicubically (in float32) for other image sizes; at the trained size that is the identity,
        so we skip it."""
        positions = self.position_embedding[:, 1:]
        if (grid_h, grid_w) == (self.grid, self.grid):
            return positions
        as_image = positions.float().reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        resampled = F.interpolate(as_image, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return resampled.reshape(1, -1, grid_h * grid_w).transpose(1, 2).to(positions.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values)  # [T, C, grid_h, grid_w]
        tiles, _, grid_h, grid_w = patches.shape
        patches = patches.flatten(2).transpose(1, 2)  # row-major patch order: [T, grid_h * grid_w, C]
        cls = self.class_embedding.expand(tiles, 1, -1)
        positions = torch.cat([self.position_embedding[:, :1], self._patch_positions(grid_h, grid_w)], dim=1)
        return torch.cat([cls, patches], dim=1) + positions


class InternViTAttention(nn.Module):
    """Fused QKV projection, optional full-width QK-RMSNorm, non-causal attention, output projection.

    Under tensor parallelism (``tp``) it holds this rank's heads of NVLM's padded layout (real heads
    then zero dummy heads, spec §3.1): qkv column-parallel, proj row-parallel (bias after the
    all-reduce), and the QK-RMSNorm's sum of squares all-reduced over the ranks."""

    def __init__(self, config: VisionConfig, *, device=None, dtype=None, tp: TPGroup | None = None) -> None:
        super().__init__()
        if config.hidden_size % config.num_heads:
            raise ValueError(f"hidden_size {config.hidden_size} is not divisible by num_heads {config.num_heads}")
        width = config.hidden_size
        self.tp = tp
        self.first_head, self.num_heads = vit_heads(config, tp)
        self.head_dim = config.head_dim
        self.real_heads, self.norm_features = config.num_heads, width  # the RMS runs over the real features
        self.num_dummy_heads = config.num_dummy_heads
        self.eps = config.norm_eps
        local = self.num_heads * self.head_dim
        kw = {"device": device, "dtype": dtype}
        self.qkv = nn.Linear(width, 3 * local, bias=config.qkv_bias, **kw)
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            # One RMS over all heads of a token (InternVL flattens the heads before q_norm/k_norm).
            self.q_norm = RMSNorm(local, config.norm_eps, **kw)
            self.k_norm = RMSNorm(local, config.norm_eps, **kw)
        self.proj = nn.Linear(local, width, bias=True, **kw)
        self.register_load_state_dict_pre_hook(_strip_dummy_heads)

    @property
    def parallel(self) -> bool:
        return self.tp is not None and self.tp.parallel

    @torch.no_grad()
    def zero_dummy_heads(self) -> None:
        """Zero this rank's dummy heads (q, k, v rows and proj columns): NVLM's padding is all zeros."""
        for head in range(self.first_head, self.first_head + self.num_heads):
            if head < self.real_heads:
                continue
            local = (head - self.first_head) * self.head_dim
            rows = slice(local, local + self.head_dim)
            qkv = self.qkv.weight.view(3, self.num_heads * self.head_dim, -1)
            qkv[:, rows] = 0
            if self.qkv.bias is not None:
                self.qkv.bias.view(3, -1)[:, rows] = 0
            self.proj.weight[:, rows] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel:
            return self._forward_parallel(x)
        tiles, tokens, width = x.shape
        qkv = self.qkv(x)  # [T, S, 3C]: the q, k and v blocks, each H heads of D
        with _nvtx.range("nvlm.vision.attention"):
            if self.qk_norm:
                out = nk.vit_qk_norm_attention(
                    qkv, self.q_norm.weight, self.k_norm.weight, num_heads=self.num_heads, eps=self.eps
                )
            else:
                # Strided views, no copies: the kernels read [T, S, H, D] through strides.
                q, k, v = qkv.view(tiles, tokens, 3, self.num_heads, self.head_dim).unbind(2)
                out = nk.vit_attention(q, k, v)
        return self.proj(out.reshape(tiles, tokens, width))

    def _forward_parallel(self, x: torch.Tensor) -> torch.Tensor:
        tiles, tokens, _ = x.shape
        qkv = self.qkv(copy_to_tp(x, self.tp))
        q, k, v = qkv.view(tiles, tokens, 3, self.num_heads, self.head_dim).unbind(2)
        with _nvtx.range("nvlm.vision.attention"):
            if self.qk_norm:
                q, k = self._qk_norm_across_ranks(q, k)
            out = nk.vit_attention(q, k, v)
        out = F.linear(out.reshape(tiles, tokens, -1), self.proj.weight)
        return reduce_from_tp(out, self.tp) + self.proj.bias  # the bias once, after the sum over ranks

    def _qk_norm_across_ranks(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """InternViT's full-width RMSNorm of q and k when each rank holds only some heads: the per-token
        sum of squares (float32) is summed over the ranks and divided by the real features (dummy heads
        add zeros), as Megatron's InternViTRMSNorm / vLLM's var_hidden_size do."""
        q32, k32 = q.float(), k.float()
        squares = torch.stack([q32.pow(2).sum((-2, -1)), k32.pow(2).sum((-2, -1))])  # [2, T, S]
        rstd = torch.rsqrt(sum_across_tp(squares, self.tp) / self.norm_features + self.eps)[..., None, None]
        shape = (self.num_heads, self.head_dim)
        q = self.q_norm.weight.view(shape) * (q32 * rstd[0]).to(q.dtype)
        k = self.k_norm.weight.view(shape) * (k32 * rstd[1]).to(k.dtype)
        return q, k


def _strip_dummy_heads(module: InternViTAttention, state_dict, prefix, *_args) -> None:
    """A ``load_state_dict`` pre-hook: NVLM's dummy-head-padded attention weights (spec §3.1), as
    in the Hugging Face checkpoint's ``vision_model.*``, load into the real heads. (A tensor-parallel
    module takes its shards from ``nvlm.parallel``, dummy heads included: nothing to strip.)"""
    if not module.num_dummy_heads or module.parallel:
        return
    real = module.num_heads * module.head_dim
    for part in ("qkv.weight", "qkv.bias", "proj.weight", "q_norm.weight", "k_norm.weight"):
        tensor = state_dict.get(prefix + part)
        if tensor is not None and tensor.device.type != "meta" and tuple(tensor.shape) != _own_shape(module, part):
            state_dict[prefix + part] = strip_dummy_heads(
                tensor, prefix + part, part, real, module.num_dummy_heads, module.head_dim
            )


def _own_shape(module: InternViTAttention, part: str) -> tuple[int, ...] | None:
    owner, name = part.split(".")
    param = getattr(getattr(module, owner, None), name, None)
    return tuple(param.shape) if param is not None else None


def _nonzero(t: torch.Tensor) -> bool:
    return bool(torch.count_nonzero(t))


def check_dummy_heads(
    sl, key: str, part: str, real_width: int, num_dummy_heads: int | None = None, head_dim: int | None = None
) -> tuple[int, list[tuple[int, int]]]:
    """Check the dummy heads of one padded InternViT attention tensor (``sl``: a tensor, or a
    safetensors slice: only the dummy parts are read) and return ``(padded width, row ranges of
    nonzero dummy q / k rows)``; ``part`` as in ``strip_dummy_heads``.

    The rule (spec §3.1, §8.2): only the dummy heads' **v rows** and **proj columns** can reach the
    output, so they must be zero (ValueError naming the key). Dummy **q / k rows** only shape the
    dummy heads' attention weights, which multiply those zero v rows, and the QK-norm statistic
    runs over the real features only (divided by ``real_width``): nonzero q / k rows are warned
    about, and the caller drops (or, keeping the padded layout, zeroes) them. The q / k norm
    weights' dummy part only ever scales those rows: not checked."""
    shape = tuple(sl.shape) if isinstance(sl, torch.Tensor) else tuple(sl.get_shape())
    padded = shape[0] // 3 if part.startswith("qkv") else shape[-1]
    if part.startswith("qkv") and shape[0] % 3:
        raise ValueError(f"{key}: first dimension {shape[0]} is not 3 blocks (q, k, v)")
    if padded < real_width:
        raise ValueError(f"{key}: shape {list(shape)} is narrower than the model's {real_width} features")
    if num_dummy_heads is not None:
        extra = padded - real_width
        if head_dim is None and num_dummy_heads:  # the head width the padding implies
            head_dim = extra // num_dummy_heads if extra % num_dummy_heads == 0 else None
        if head_dim is None or extra != num_dummy_heads * head_dim or real_width % head_dim:
            raise ValueError(
                f"{key}: shape {list(shape)} is not {real_width} real features + {num_dummy_heads} dummy heads"
                + (f" of width {head_dim}" if head_dim else "")
            )
    nonzero_qk: list[tuple[int, int]] = []
    if padded == real_width or part in ("q_norm.weight", "k_norm.weight"):
        return padded, nonzero_qk
    if part == "proj.weight":
        if _nonzero(sl[:, real_width:padded]):
            raise ValueError(
                f"{key}: the dummy-head columns {real_width}..{padded} are not all zero (they would add the dummy "
                "heads' outputs to the ViT's)"
            )
        return padded, nonzero_qk
    for block, name in enumerate("qkv"):
        start, end = block * padded + real_width, (block + 1) * padded
        if not _nonzero(sl[start:end]):
            continue
        if name == "v":
            raise ValueError(
                f"{key}: the dummy-head rows of the v block ({start}..{end}) are not all zero (they would reach the "
                "output through the attention)"
            )
        nonzero_qk.append((start, end))
        warnings.warn(
            f"{key}: the dummy-head rows of the {name} block ({start}..{end}) are not all zero; they cannot change "
            "the output (the dummy heads' v rows are zero and the QK-norm statistic covers the real features only) "
            "and are dropped",
            UserWarning,
            stacklevel=3,
        )
    return padded, nonzero_qk


def strip_dummy_heads(
    sl, key: str, part: str, real_width: int, num_dummy_heads: int | None = None, head_dim: int | None = None
) -> torch.Tensor:
    """The real-head part of one padded InternViT attention tensor (``sl``: a tensor, or a safetensors
    slice so that a checkpoint loader reads only the parts it keeps); ``part`` is the name under the
    layer's ``attn.`` (``qkv.weight``, ``qkv.bias``, ``proj.weight``, ``q_norm.weight``, ``k_norm.weight``).
    The dummy heads are checked first (``check_dummy_heads``: nonzero v rows or proj columns raise,
    nonzero q / k rows warn).

    HF layout (spec §3.1), W = (heads + dummy) · head_dim, C = real_width = heads · head_dim:
    qkv.weight [3W, C] / qkv.bias [3W]: q, k, v blocks of W rows each, dummy heads last in each block
    (rows C..W); proj.weight [C, W]: dummy columns C..W; q_norm / k_norm weight [W].
    """
    padded, _ = check_dummy_heads(sl, key, part, real_width, num_dummy_heads, head_dim)
    if padded == real_width:
        return sl[:]
    if part in ("q_norm.weight", "k_norm.weight"):
        return sl[:real_width]
    if part == "proj.weight":
        return sl[:, :real_width]
    return torch.cat([sl[block * padded : block * padded + real_width] for block in range(3)])


class InternViTMLP(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2, both with bias (under ``tp``: fc1 column-, fc2 row-parallel)."""

    def __init__(self, config: VisionConfig, *, device=None, dtype=None, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.tp = tp
        width = config.mlp_size // (tp.size if tp is not None else 1)
        self.fc1 = nn.Linear(config.hidden_size, width, bias=True, device=device, dtype=dtype)
        self.fc2 = nn.Linear(width, config.hidden_size, bias=True, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp is None or not self.tp.parallel:
            return self.fc2(F.gelu(self.fc1(x)))
        partial = F.linear(F.gelu(self.fc1(copy_to_tp(x, self.tp))), self.fc2.weight)
        return reduce_from_tp(partial, self.tp) + self.fc2.bias


class InternViTLayer(nn.Module):
    """x += ls1 · attn(norm1(x)); x += ls2 · mlp(norm2(x)) (drop-path is training-only and omitted)."""

    def __init__(self, config: VisionConfig, index: int, *, device=None, dtype=None, tp: TPGroup | None = None) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.index = index
        self._nvtx_label = f"nvlm.vision.layer[{index}]"
        self.norm1 = _norm(config, **kw)
        self.attn = InternViTAttention(config, **kw, tp=tp)
        self.ls1 = nn.Parameter(torch.empty(config.hidden_size, **kw))
        self.norm2 = _norm(config, **kw)
        self.mlp = InternViTMLP(config, **kw, tp=tp)
        self.ls2 = nn.Parameter(torch.empty(config.hidden_size, **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _nvtx.range(self._nvtx_label):
            x = x + self.ls1 * self.attn(self.norm1(x))
            return x + self.ls2 * self.mlp(self.norm2(x))


class InternViTEncoder(nn.Module):
    def __init__(self, config: VisionConfig, *, device=None, dtype=None, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            InternViTLayer(config, i, device=device, dtype=dtype, tp=tp) for i in range(config.num_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class InternViT(nn.Module):
    """pixel_values [T, 3, S, S] -> last hidden state [T, 1 + (S / patch)², C], CLS first, no final norm.

    NVLM drops the CLS token before the pixel shuffle (``nvlm.MLPProjector`` does that itself)."""

    def __init__(self, config: VisionConfig, *, device=None, dtype=None, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.config = config
        self.embeddings = InternViTEmbeddings(config, device=device, dtype=dtype)
        self.encoder = InternViTEncoder(config, device=device, dtype=dtype, tp=tp)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random weights for runs without a checkpoint: N(0, 0.02) matrices and embeddings, zero
        biases, unit norms, layer scales at ``layer_scale_init``. Deterministic under
        ``torch.manual_seed``; on the meta device the ``nn.init`` calls write nothing."""
        embeddings = self.embeddings
        for tensor in (embeddings.class_embedding, embeddings.position_embedding, embeddings.patch_embedding.weight):
            nn.init.normal_(tensor, std=INIT_STD)
        nn.init.zeros_(embeddings.patch_embedding.bias)
        for layer in self.encoder.layers:
            for module in layer.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=INIT_STD)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                    nn.init.ones_(module.weight)
                    if getattr(module, "bias", None) is not None:
                        nn.init.zeros_(module.bias)
            nn.init.constant_(layer.ls1, self.config.layer_scale_init)
            nn.init.constant_(layer.ls2, self.config.layer_scale_init)
            if layer.attn.parallel:  # NVLM's padding heads are zeros (spec §3.1)
                layer.attn.zero_dummy_heads()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must have shape [T, {self.config.num_channels}, H, W], got {tuple(pixel_values.shape)}"
            )
        weight = self.embeddings.patch_embedding.weight
        pixel_values = pixel_values.to(dtype=weight.dtype)
        return self.encoder(self.embeddings(pixel_values))
