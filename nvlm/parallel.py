"""Tensor parallelism (Megatron style) for the NVLM models, with plain ``torch.distributed`` collectives.

Why not DTensor: our kernels are custom ``torch.library`` ops with no DTensor sharding rules; the
InternViT QK-RMSNorm needs a cross-rank sum of squares *inside* attention; and the vocabulary-parallel
embedding needs a masked lookup. Explicit local shards plus Megatron's two autograd functions are
simpler, and every kernel runs unchanged on the rank's own heads / channels.

* ``copy_to_tp``: identity forward, all-reduce backward (the input of a column-parallel layer: every
  rank's partial input gradient is summed).
* ``reduce_from_tp``: all-reduce forward, identity backward (the output of a row-parallel layer).
  Not ``torch.distributed.nn.functional.all_reduce``: its backward all-reduces too, which would
  multiply the gradient of a loss every rank computes identically by the TP size.
* ``gather_from_tp``: all-gather along the last dim forward, own slice backward (vocab-parallel logits).
* ``sum_across_tp``: all-reduce forward *and* backward, for a partial statistic (the QK-norm sum of
  squares) that each rank then uses on its own, different, heads.

Sharding (every rank of the default process group is one TP rank; no data / pipeline parallelism):

* LLM self-attention and cross-attention: q / k / v column-parallel by heads, o_proj row-parallel +
  all-reduce. GQA: kv heads are split when ``num_kv_heads >= tp``; otherwise every rank keeps the kv
  head its q heads use (replicated; its weight gradient is summed over the ranks sharing it).
* SwiGLU: gate / up column-parallel, down row-parallel. Norms replicated.
* ``embed_tokens`` vocabulary-parallel (out-of-range ids masked to 0, then all-reduce); ``lm_head``
  column-parallel with the logits all-gathered (simple and correct: every rank sees the full logits,
  so sampling and the loss are computed identically everywhere).
* Projector: LayerNorm replicated, first Linear column-parallel, second row-parallel (bias added once,
  after the all-reduce). NVLM-X's one-Linear projector is *replicated*: 12800x8192 is 0.2 GB in bf16,
  and replicated it runs the fused op unchanged with no collective at all.
* InternViT: NVLM's padded layout (real + ``num_dummy_heads`` zero heads, 25 + 7 = 32 at 6B) so the
  heads divide by 2 / 4 / 8; qkv column-parallel by heads, proj row-parallel (bias after the
  all-reduce), QK-RMSNorm over the all-reduced per-token sum of squares of the real features
  (divided by ``hidden_size``, e.g. 3200: dummy heads contribute zeros), fc1 column / fc2 row.
  The ViT runs tensor-parallel like the LLM; every rank gets the full image embeddings after the
  projector's all-reduce, so nothing needs broadcasting.
* Row-parallel biases are added once, after the all-reduce.

With TP size 1 every function here is the identity and the modules are exactly the single-process ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from nvlm.layers import SwiGLU

# --------------------------------------------------------------------------------------------------
# the group


@dataclass(frozen=True)
class TPGroup:
    """This process's place in the tensor-parallel group: the default process group when
    ``torch.distributed`` is initialized. ``size`` 1 is a single process (no collective ever runs)."""

    size: int = 1
    rank: int = 0

    @classmethod
    def current(cls) -> TPGroup:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_world_size(), dist.get_rank())
        return cls()

    @classmethod
    def resolve(cls, tp: int | TPGroup | None) -> TPGroup:
        """``None``: the world (or 1); an int: that size, which must equal the world size when
        torch.distributed is initialized (a size > 1 without it is only for meta-device counting)."""
        if isinstance(tp, TPGroup):
            return tp
        world = cls.current()
        if tp is None:
            return world
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tp must be a positive int, got {tp!r}")
        if dist.is_available() and dist.is_initialized():
            if tp != world.size:
                raise ValueError(f"tp={tp} but the torch.distributed world has {world.size} processes: they must match")
            return world
        return cls(tp, 0)

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def chunk(self, n: int) -> tuple[int, int]:
        """[start, end) of this rank's equal share of n (n divisible by size)."""
        part = n // self.size
        return self.rank * part, (self.rank + 1) * part


def tp_of(tp: TPGroup | None) -> TPGroup:
    return tp if tp is not None else TPGroup()


# --------------------------------------------------------------------------------------------------
# autograd functions


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    out = x.contiguous().clone()  # all_reduce works in place: never on a tensor autograd saved
    dist.all_reduce(out)
    return out


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad)


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _SumAcrossTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad)


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rank, size):
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x)
        ctx.rank, ctx.width = rank, x.shape[-1]
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad[..., ctx.rank * ctx.width : (ctx.rank + 1) * ctx.width], None, None


class _SumGradOverReplicas(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the ranks holding the same replica
    (``slot``): each rank writes its gradient into its slot of a [num_slots, ...] buffer, one
    all-reduce, each takes its slot's sum. For the kv projections kept whole on several ranks."""

    @staticmethod
    def forward(ctx, weight, slot, num_slots):
        ctx.slot, ctx.num_slots = slot, num_slots
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        buffer = grad.new_zeros((ctx.num_slots, *grad.shape))
        buffer[ctx.slot] = grad
        dist.all_reduce(buffer)
        return buffer[ctx.slot], None, None


def copy_to_tp(x: torch.Tensor, tp: TPGroup | None) -> torch.Tensor:
    return _CopyToTP.apply(x) if tp is not None and tp.parallel else x


def reduce_from_tp(x: torch.Tensor, tp: TPGroup | None) -> torch.Tensor:
    return _ReduceFromTP.apply(x) if tp is not None and tp.parallel else x


def sum_across_tp(x: torch.Tensor, tp: TPGroup | None) -> torch.Tensor:
    return _SumAcrossTP.apply(x) if tp is not None and tp.parallel else x


def gather_from_tp(x: torch.Tensor, tp: TPGroup | None) -> torch.Tensor:
    return _GatherFromTP.apply(x, tp.rank, tp.size) if tp is not None and tp.parallel else x


def sum_grad_over_replicas(weight: torch.Tensor, heads: KVHeads) -> torch.Tensor:
    if not heads.replicated:
        return weight
    return _SumGradOverReplicas.apply(weight, heads.first, heads.total)


def kv_projection(proj: torch.nn.Linear, x: torch.Tensor, heads: KVHeads) -> torch.Tensor:
    """``proj(x)``; a kv projection that several TP ranks hold whole gets its weight gradient summed
    over them (each rank's gradient covers only its own query heads)."""
    if not heads.replicated:
        return proj(x)
    bias = sum_grad_over_replicas(proj.bias, heads) if proj.bias is not None else None
    return torch.nn.functional.linear(x, sum_grad_over_replicas(proj.weight, heads), bias)


# --------------------------------------------------------------------------------------------------
# head / channel bookkeeping


@dataclass(frozen=True)
class KVHeads:
    """The kv heads a rank holds: ``first`` .. ``first + count`` of ``total``; ``replicated`` when
    several ranks hold the same one (num_kv_heads < tp)."""

    first: int
    count: int
    total: int
    replicated: bool


def query_heads(num_heads: int, tp: TPGroup | None) -> tuple[int, int]:
    """(first, count) of this rank's query heads."""
    tp = tp_of(tp)
    first, end = tp.chunk(num_heads)
    return first, end - first


def kv_heads(num_heads: int, num_kv_heads: int, tp: TPGroup | None) -> KVHeads:
    tp = tp_of(tp)
    if num_kv_heads >= tp.size:
        first, end = tp.chunk(num_kv_heads)
        return KVHeads(first, end - first, num_kv_heads, False)
    q_first, _ = query_heads(num_heads, tp)
    return KVHeads(q_first // (num_heads // num_kv_heads), 1, num_kv_heads, tp.parallel)


def vit_heads(config, tp: TPGroup | None) -> tuple[int, int]:
    """(first, count) of this rank's InternViT heads: among the real ones at TP 1, among real +
    dummy (NVLM's padded layout) at TP > 1."""
    tp = tp_of(tp)
    total = config.num_heads + (config.num_dummy_heads if tp.parallel else 0)
    first, end = tp.chunk(total)
    return first, end - first


def check_tp(config, tp: int) -> None:
    """ValueError when ``tp`` does not divide what tensor parallelism splits."""
    if tp == 1:
        return
    v, llm, p = config.vision, config.llm, config.projector
    problems = []
    vit_total = v.num_heads + v.num_dummy_heads
    if vit_total % tp:
        problems.append(f"the ViT's {v.num_heads} + {v.num_dummy_heads} dummy heads = {vit_total}")
    if v.mlp_size % tp:
        problems.append(f"the ViT's MLP width {v.mlp_size}")

    def attention(what: str, heads: int, kv: int) -> None:
        if heads % tp:
            problems.append(f"the {what}'s {heads} query heads")
        elif kv >= tp and kv % tp:
            problems.append(f"the {what}'s {kv} kv heads")
        elif kv < tp and tp % kv:
            problems.append(f"the {what}'s {kv} kv heads (tp must be a multiple of them when larger)")

    attention("LLM", llm.num_heads, llm.num_kv_heads)
    if llm.intermediate_size % tp:
        problems.append(f"the LLM's FFN width {llm.intermediate_size}")
    if llm.vocab_size % tp:
        problems.append(f"the vocabulary {llm.vocab_size}")
    if p.hidden is not None and p.hidden % tp:
        problems.append(f"the projector's hidden width {p.hidden}")
    if config.xattn is not None:
        x = config.xattn
        attention("cross-attention", x.num_heads or llm.num_heads, x.num_kv_heads or llm.num_kv_heads)
    if problems:
        raise ValueError(f"tensor parallel size {tp} does not divide " + "; ".join(problems) + f" ({config.name})")


# --------------------------------------------------------------------------------------------------
# sharding a full state dict (or a safetensors slice) for one rank


def _shape(source) -> tuple[int, ...]:
    return tuple(source.shape) if isinstance(source, torch.Tensor) else tuple(source.get_shape())


def _projector_linears(config) -> tuple[str | None, str | None]:
    """Names (under ``projector.``) of the column- and row-parallel Linears (None: replicated)."""
    p = config.projector
    if p.hidden is None:
        return None, None
    first = 1 if p.layer_norm else 0
    return str(first), str(first + 2)


def _vit_heads_rows(source, key: str, part_rows: int, head_dim: int, heads: tuple[int, int], real: int, dim: int):
    """This rank's heads of one block of ``part_rows`` features along ``dim`` (0 or 1) of ``source``
    starting at feature 0; heads past what the source holds (a real-heads-only source) are zeros,
    dummy heads the source does hold are checked to be zero."""
    first, count = heads
    pieces = []
    shape = _shape(source)
    for head in range(first, first + count):
        start = head * head_dim
        if start + head_dim <= part_rows:
            index = (slice(start, start + head_dim),) if dim == 0 else (slice(None), slice(start, start + head_dim))
            piece = source[index]
            if start >= real and bool(torch.count_nonzero(piece)) and not key.endswith("norm.weight"):
                raise ValueError(f"{key}: dummy head {head} is not all zero")
            if start >= real and key.endswith("norm.weight"):
                piece = torch.zeros_like(piece)  # dummy heads' norm weights only scale zeros
        else:
            zero_shape = list(shape)
            zero_shape[dim] = head_dim
            piece = torch.zeros(zero_shape, dtype=_dtype_of(source))
        pieces.append(piece)
    return torch.cat(pieces, dim=dim)


def _dtype_of(source) -> torch.dtype:
    if isinstance(source, torch.Tensor):
        return source.dtype
    return source[0:1].dtype  # a safetensors slice: read one row to learn its torch dtype


def local_shard(name: str, source, config, tp: TPGroup | None):
    """This rank's part of the full tensor ``name`` (our parameter names; the ViT attention may be
    real heads only or NVLM's padded layout). ``source``: a tensor or a safetensors slice (only the
    rank's part is read). Replicated tensors are returned whole."""
    tp = tp_of(tp)
    if not tp.parallel:
        return source[:] if not isinstance(source, torch.Tensor) else source
    shape = _shape(source)
    parts = name.split(".")

    def rows(start: int, end: int):
        return source[start:end]

    def cols(start: int, end: int):
        return source[:, start:end]

    if parts[0] == "vision" and ".attn." in name:
        v = config.vision
        part = ".".join(parts[-2:])
        heads = vit_heads(v, tp)
        real, d = v.hidden_size, v.head_dim
        if part in ("qkv.weight", "qkv.bias"):
            block = shape[0] // 3
            blocks = [
                _vit_heads_rows(_Offset(source, b * block, block), name, block, d, heads, real, 0) for b in range(3)
            ]
            return torch.cat(blocks)
        if part == "proj.weight":
            return _vit_heads_rows(source, name, shape[1], d, heads, real, 1)
        if part in ("q_norm.weight", "k_norm.weight"):
            return _vit_heads_rows(source, name, shape[0], d, heads, real, 0)
        return source[:]  # proj.bias
    if parts[0] == "vision" and ".mlp." in name:
        start, end = tp.chunk(config.vision.mlp_size)
        if "fc1" in name:
            return rows(start, end)
        return cols(start, end) if name.endswith("fc2.weight") else source[:]
    if parts[0] == "projector":
        column, row = _projector_linears(config)
        if parts[1] == column:
            return rows(*tp.chunk(shape[0]))
        if parts[1] == row and parts[2] == "weight":
            return cols(*tp.chunk(shape[1]))
        return source[:]
    if name in ("llm.embed_tokens.weight", "llm.lm_head.weight"):
        return rows(*tp.chunk(shape[0]))
    llm = config.llm
    if parts[0] == "llm":
        num_heads, num_kv = llm.num_heads, llm.num_kv_heads
    elif parts[0] == "xattn":
        x = config.xattn
        num_heads, num_kv = x.num_heads or llm.num_heads, x.num_kv_heads or llm.num_kv_heads
    else:
        return source[:]
    d = llm.head_dim
    leaf = ".".join(parts[-2:])
    if leaf.startswith("q_proj."):
        first, count = query_heads(num_heads, tp)
        return rows(first * d, (first + count) * d)
    if leaf.startswith(("k_proj.", "v_proj.")):
        heads = kv_heads(num_heads, num_kv, tp)
        return rows(heads.first * d, (heads.first + heads.count) * d)
    if leaf == "o_proj.weight":
        first, count = query_heads(num_heads, tp)
        return cols(first * d, (first + count) * d)
    if leaf in ("gate_proj.weight", "up_proj.weight"):
        return rows(*tp.chunk(shape[0]))
    if leaf == "down_proj.weight":
        return cols(*tp.chunk(shape[1]))
    return source[:]


class _Offset:
    """Rows offset .. offset + length of a tensor or safetensors slice, indexable like one."""

    def __init__(self, source, offset: int, length: int) -> None:
        self.source, self.offset, self.length = source, offset, length

    def get_shape(self):
        return [self.length, *_shape(self.source)[1:]]

    def __getitem__(self, index):
        first = index[0] if isinstance(index, tuple) else index
        rows = slice(self.offset + first.start, self.offset + first.stop)
        return self.source[rows]


def shard_state_dict(full_state_dict: dict[str, torch.Tensor], model_config, tp: int, rank: int) -> dict:
    """The state dict of rank ``rank`` of a TP-``tp`` model, from a single-process state dict."""
    group = TPGroup(tp, rank)
    return {name: local_shard(name, tensor, model_config, group).clone() for name, tensor in full_state_dict.items()}


# --------------------------------------------------------------------------------------------------
# process-level helpers


def all_ranks_ok(ok: bool, tp: TPGroup | None) -> list[int]:
    """Every rank says whether it succeeded; returns the ranks that failed (the same list on every rank)."""
    tp = tp_of(tp)
    if not tp.parallel:
        return [] if ok else [0]
    flags = torch.zeros(tp.size, dtype=torch.int32)
    flags[tp.rank] = 0 if ok else 1
    dist.all_reduce(flags)
    return [r for r in range(tp.size) if flags[r]]


def agree_on_success(action, tp: TPGroup | None, what: str):
    """Run ``action()`` on every rank; if it fails anywhere, raise on every rank (this one's own
    error, or a ValueError naming the failed ranks) instead of leaving the others in a collective."""
    tp = tp_of(tp)
    if not tp.parallel:
        return action()
    try:
        result = action()
    except Exception:
        all_ranks_ok(False, tp)
        raise
    failed = all_ranks_ok(True, tp)
    if failed:
        raise ValueError(f"{what} failed on rank(s) {', '.join(map(str, failed))}")
    return result


def init_from_env(device_type: str, timeout_s: float = 300.0) -> TPGroup:
    """Initialize the default process group when launched by torchrun (WORLD_SIZE in the
    environment): gloo on CPU, nccl on CUDA, with a timeout so that a lost rank ends in an error."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return TPGroup.current()


def rank_path(path: Any, rank: int, size: int):
    """``trace.json`` -> ``trace.rank{r}.json`` when there is more than one rank."""
    from pathlib import Path

    path = Path(path)
    if size <= 1:
        return path
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


# --------------------------------------------------------------------------------------------------
# modules


class ParallelSwiGLU(SwiGLU):
    """SwiGLU with gate / up column-parallel and down row-parallel (this rank's share of the
    ``intermediate`` channels); the same parameter names as ``SwiGLU``."""

    def __init__(self, hidden: int, intermediate: int, tp: TPGroup, *, device=None, dtype=None) -> None:
        super().__init__(hidden, intermediate // tp.size, device=device, dtype=dtype)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_from_tp(super().forward(copy_to_tp(x, self.tp)), self.tp)


def make_swiglu(hidden: int, intermediate: int, tp: TPGroup | None, *, device=None, dtype=None) -> SwiGLU:
    """``SwiGLU`` at TP 1, its tensor-parallel form otherwise."""
    if tp is None or not tp.parallel:
        return SwiGLU(hidden, intermediate, device=device, dtype=dtype)
    return ParallelSwiGLU(hidden, intermediate, tp, device=device, dtype=dtype)
