"""Text generation for NVLM-D / X / H: a prefill over the prompts, then one token per step.

    out = nvlm.generate.generate(model, inputs, max_new_tokens=64, stop_token_ids=[tokenizer.eos_token_id])
    texts = [tokenizer.decode(row[:n]) for row, n in zip(out.sequences, out.lengths)]

The images are encoded once, in the prefill. The decoder's keys/values go into a ``KVCache``; for
NVLM-X / NVLM-H every cross-attention block projects the image keys/values once per request
(``CrossAttentionCache``), and every generated token attends to the same key range: the prompt's
last image (all of them with ``attend_all_previous``), or nothing in a row without images. A
decoding step is therefore one query token per row, which ``gated_cross_attention`` runs through its
decode kernel.

The processor pads on the right; generation moves each prompt to the right end of the batch (left
padding), so that every row's next token lands in the same column of the cache. Positions count
real tokens only, so a row's positions are those it would have alone.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed

from nvlm.model import NVLM, CrossAttentionCache
from nvlm_kernels import _nvtx


@dataclass
class GenerationOutput:
    """sequences: [B, N] the generated ids (N ≤ max_new_tokens: generation ends when every row has
    stopped), ``pad_token_id`` after a row's stop token. lengths: [B] generated tokens per row, its
    stop token included. finished: [B] True where the row emitted a stop token (False: it ran out
    of ``max_new_tokens``)."""

    sequences: torch.Tensor
    lengths: torch.Tensor
    finished: torch.Tensor


# --------------------------------------------------------------------------------------------------
# sampling


def sample_next_token(
    logits: torch.Tensor,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] -> token ids [B]. Greedy (argmax) without ``do_sample``; otherwise the logits
    are divided by ``temperature``, cut to the ``top_k`` largest, then to the nucleus (the smallest
    set of most likely tokens whose probability reaches ``top_p``, never empty), and a token is drawn
    with ``generator``."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        # exactly k tokens survive, even when several share the k-th value
        kept = torch.topk(logits, top_k, dim=-1)
        logits = torch.full_like(logits, -torch.inf).scatter(-1, kept.indices, kept.values)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # a token is cut when the more likely tokens before it already reach top_p; the first never is
        mass_before = probs.cumsum(-1) - probs
        cut = mass_before >= top_p
        cut[..., 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(cut, -torch.inf))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_options(max_new_tokens, do_sample, temperature, top_k, top_p) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not do_sample:
        return
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p!r}")


# --------------------------------------------------------------------------------------------------
# left padding


def left_padded(inputs):
    """A copy of right-padded ``inputs`` (the processor's layout) with every row moved to the right
    end, and the per-position fields (``image_token_mask``, ``tag_tiles``, ``image_positions``)
    moved with it. The width becomes the longest row (extra padding columns are dropped); labels
    are dropped (generation has none). Raises ValueError when a row is empty or not right-padded."""
    mask = inputs.attention_mask.to(torch.bool)
    lengths = mask.sum(1)
    width = int(lengths.max()) if lengths.numel() else 0
    columns = torch.arange(mask.shape[1], device=mask.device)
    if bool((lengths == 0).any()) or not torch.equal(mask, columns[None] < lengths[:, None]):
        raise ValueError("generate needs right-padded prompts (real tokens first), none of them empty")
    shift = width - lengths  # [B]: left padding each row gets
    source = torch.arange(width, device=mask.device)[None] - shift[:, None]  # old column of each new one
    real = source >= 0
    source = source.clamp(min=0)

    def move(values: torch.Tensor, fill) -> torch.Tensor:
        return torch.where(real, values.gather(1, source), fill)

    moved = copy.copy(inputs)
    moved.input_ids = move(inputs.input_ids, 0)  # any id in the vocabulary: padding is masked out
    moved.attention_mask = real
    moved.image_token_mask = move(inputs.image_token_mask.to(torch.bool), False)
    moved.tag_tiles = move(inputs.tag_tiles, -1)
    positions = inputs.image_positions
    moved.image_positions = torch.where(positions >= 0, positions + shift[:, None].to(positions.dtype), positions)
    moved.labels = None
    return moved


# --------------------------------------------------------------------------------------------------


@torch.inference_mode()
def generate(
    model: NVLM,
    inputs,
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token_ids: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    pad_token_id: int = 0,
) -> GenerationOutput:
    """Continue each prompt of ``inputs`` (``NVLMInputs`` from the processor, with the generation
    prompt) by up to ``max_new_tokens`` tokens.

    Args:
        do_sample: False: greedy. True: sample after ``temperature``, ``top_k`` and ``top_p`` (see
            ``sample_next_token``) with ``generator`` (on the model's device; None: torch's default).
        stop_token_ids: ids that end a row (it is kept, then the row is padded); typically the
            tokenizer's ``<|im_end|>``. None: rows only end at ``max_new_tokens``.
        pad_token_id: what ``sequences`` holds after a row's stop token.

    Raises ValueError, before any kernel runs, when the longest prompt plus ``max_new_tokens``
    exceeds ``config.max_seq_len`` or an option is out of range.
    """
    _check_options(max_new_tokens, do_sample, temperature, top_k, top_p)
    prompts = left_padded(inputs)
    batch, width = prompts.input_ids.shape
    limit = model.config.max_seq_len
    if width + max_new_tokens > limit:
        raise ValueError(
            f"the longest prompt ({width} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the model's maximum "
            f"sequence length {limit} (config.max_seq_len)"
        )
    facts = model.check_inputs(prompts)  # the prefill's one device -> host transfer
    device = prompts.input_ids.device
    stop_ids = torch.tensor(list(stop_token_ids or ()), dtype=torch.long, device=device)

    # The last generated token is never fed back, so the cache needs one position less.
    cache = model.llm.new_cache(batch, width + max_new_tokens - 1)
    cross_cache = CrossAttentionCache()
    # Decoding masks: the prompt's, then one column per fed token (real in every row; a stopped
    # row keeps decoding, its tokens are discarded). None when no row has padding.
    full_mask = None
    if not facts.all_real:
        full_mask = torch.ones((batch, width + max_new_tokens - 1), dtype=torch.bool, device=device)
        full_mask[:, :width] = prompts.attention_mask

    def choose(logits: torch.Tensor) -> torch.Tensor:
        token = sample_next_token(
            logits[:, -1], do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        )
        tp = getattr(model, "tp", None)
        if do_sample and tp is not None and tp.parallel:
            # Every tensor-parallel rank has the same logits, but its own random stream: rank 0's
            # draw decides, so that all ranks keep feeding the same tokens.
            torch.distributed.broadcast(token, src=0)
        return token

    with _nvtx.range("nvlm.llm.prefill"):
        hidden = model.hidden_states(prompts, cache=cache, cross_cache=cross_cache, facts=facts)
        token = choose(model.llm.logits(hidden[:, -1:]))  # the prompt's other positions need no logits

    sequences = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    lengths = torch.zeros(batch, dtype=torch.long, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = 0
    while True:
        sequences[:, steps] = torch.where(finished, pad_token_id, token)
        lengths += (~finished).long()
        finished |= torch.isin(token, stop_ids)
        steps += 1
        if steps == max_new_tokens or bool(finished.all()):  # one host sync per token
            break
        with _nvtx.range("nvlm.generate.step"):
            mask = full_mask[:, : cache.length + 1] if full_mask is not None else None
            # a stopped row is fed its own (discarded) choice: always an id in the vocabulary
            logits = model.decode_step(token[:, None], cache, cross_cache, mask)
            token = choose(logits)
    return GenerationOutput(sequences[:, :steps], lengths, finished)
