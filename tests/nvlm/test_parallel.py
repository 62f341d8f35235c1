"""Tensor parallelism (nvlm.parallel) on the CPU with gloo: 2 ranks against the single-process model.

The tiny presets split at TP 2 only: their LLM has 2 query heads and 1 kv head, so TP 4 does not
divide the query heads (the ViT's 2 + 2 dummy heads would). One spawned 2-rank session runs every
multi-process check (forward of D / X / H, greedy generation, sharded checkpoint loading, gradients,
a world-size mismatch, a rank failing to load) and the tests compare what it saved with the
single-process results computed here. Every process is joined with a timeout and killed if alive.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from PIL import Image

from nvlm import NVLMConfig, build_model, parameter_counts
from nvlm.checkpoint import load_checkpoint, save_checkpoint
from nvlm.generate import generate
from nvlm.parallel import TPGroup, check_tp, shard_state_dict
from nvlm.processor import NVLMProcessor
from nvlm.tokenizer import ByteTokenizer

TP = 2
VARIANTS = ("tiny-d", "tiny-x", "tiny-h")
NEW_TOKENS = 4
SESSION_TIMEOUT_S = 240
TOL = 1e-4
CONVERSATIONS = [
    [{"role": "user", "content": "No image here, just text?"}],
    [{"role": "user", "content": "<image> What?"}],
    [{"role": "user", "content": "<image> and <image>: compare."}],
]


def _image(width: int, height: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy())


def _inputs(config, *, labels: bool = False):
    images = [[], [_image(120, 60, 1)], [_image(60, 60, 2), _image(50, 140, 3)]]
    conversations = CONVERSATIONS
    if labels:
        conversations = [c + [{"role": "assistant", "content": "A reply."}] for c in CONVERSATIONS]
    processor = NVLMProcessor(ByteTokenizer(), config)
    return processor(conversations, images, add_generation_prompt=not labels, return_labels=labels)


def _full_model(preset: str):
    """Single-process model: random weights of seed 0, float32, the cross-attention gates opened
    (they start at 0, which would make the blocks the identity)."""
    torch.manual_seed(0)
    model = build_model(preset, tp=1).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate"):
                param.fill_(0.8)
    return model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# the 2-rank session


def _session(rank: int, world: int, port: int, workdir: str) -> None:
    """One rank: every multi-process check; results to workdir/rank{r}.pt (errors to rank{r}.err)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    workdir = Path(workdir)
    try:
        from datetime import timedelta

        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
        torch.set_num_threads(1)
        results: dict = {}
        full_states = torch.load(workdir / "full_states.pt")
        for preset in VARIANTS:
            config = NVLMConfig.from_preset(preset)
            torch.manual_seed(0)
            model = build_model(preset)  # tp from the world: 2
            model.load_state_dict(shard_state_dict(full_states[preset], config, world, rank))
            model.eval()
            with torch.no_grad():
                results[f"{preset}/logits"] = model(_inputs(config)).logits
            out = generate(model, _inputs(config), max_new_tokens=NEW_TOKENS)
            results[f"{preset}/tokens"] = out.sequences
            torch.manual_seed(100 + rank)  # a different random stream on each rank
            results[f"{preset}/sampled"] = generate(
                model, _inputs(config), max_new_tokens=NEW_TOKENS, do_sample=True, temperature=5.0
            ).sequences
            model.zero_grad()
            loss = model(_inputs(config, labels=True)).loss
            loss.backward()
            results[f"{preset}/loss"] = loss.detach()
            results[f"{preset}/grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

        # sharded loading: our layout and Hugging Face NVLM-D's
        config = NVLMConfig.from_preset("tiny-d")
        for kind in ("ours", "hf"):
            model = build_model("tiny-d", device="meta")  # only shapes: loading materializes them
            model = model.to_empty(device="cpu")
            if kind == "ours":
                load_checkpoint(model, workdir / "ours", dtype=torch.float32)
            else:
                from nvlm.checkpoint import load_hf_nvlm_d

                load_hf_nvlm_d(model, workdir / "hf", dtype=torch.float32)
            results[f"load/{kind}"] = {k: v.clone() for k, v in model.state_dict().items()}

        # a world-size mismatch
        try:
            build_model("tiny-d", tp=3)
        except ValueError as error:
            results["mismatch"] = str(error)

        # one rank fails to load (rank 1 is given a directory without weights): every rank raises
        model = build_model("tiny-d")
        try:
            load_checkpoint(model, workdir / ("ours" if rank == 0 else "missing"))
        except (ValueError, FileNotFoundError) as error:
            results["load_failure"] = f"{type(error).__name__}: {error}"
        flag = torch.ones(1)
        dist.all_reduce(flag)  # the group still works afterwards: nobody is stuck in a collective
        results["after_failure"] = float(flag)
        torch.save(results, workdir / f"rank{rank}.pt")
    except BaseException:
        (workdir / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_ranks(world: int, workdir: Path, timeout_s: float) -> None:
    """Run ``_session`` in ``world`` processes (this file as a script: pytest's importlib mode makes
    the test module unimportable by name in a spawned child); kill whatever outlives the timeout."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "session", str(world), str(port), str(workdir)]
    procs = [subprocess.Popen([*command, str(r)], env=env) for r in range(world)]
    try:
        for p in procs:
            p.wait(timeout_s)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    messages = [e.read_text() for e in (workdir / f"rank{r}.err" for r in range(world)) if e.exists()]
    assert not messages, "\n".join(messages)
    assert all(p.returncode == 0 for p in procs), [p.returncode for p in procs]


@pytest.fixture(scope="module")
def session(tmp_path_factory, hf_layout):
    workdir = tmp_path_factory.mktemp("tp")
    full = {preset: _full_model(preset) for preset in VARIANTS}
    torch.save({preset: model.state_dict() for preset, model in full.items()}, workdir / "full_states.pt")
    save_checkpoint(full["tiny-d"], workdir / "ours")
    hf_layout.write(workdir / "hf", hf_layout.to_hf(full["tiny-d"].state_dict(), full["tiny-d"].config))
    _run_ranks(TP, workdir, SESSION_TIMEOUT_S)
    ranks = [torch.load(workdir / f"rank{r}.pt") for r in range(TP)]
    return full, ranks


# --------------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("preset", VARIANTS)
def test_forward_logits_equal_the_single_process_ones(session, preset):
    full, ranks = session
    with torch.no_grad():
        expected = full[preset](_inputs(full[preset].config)).logits
    for rank in ranks:
        torch.testing.assert_close(rank[f"{preset}/logits"], expected, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("preset", VARIANTS)
def test_greedy_generation_gives_the_same_tokens(session, preset):
    full, ranks = session
    expected = generate(full[preset], _inputs(full[preset].config), max_new_tokens=NEW_TOKENS).sequences
    for rank in ranks:
        assert torch.equal(rank[f"{preset}/tokens"], expected)


def test_sampling_draws_the_same_tokens_on_every_rank(session):
    _, ranks = session
    for preset in VARIANTS:
        assert torch.equal(ranks[0][f"{preset}/sampled"], ranks[1][f"{preset}/sampled"])


@pytest.mark.parametrize("preset", VARIANTS)
def test_one_training_step_gives_the_same_gradients(session, preset):
    full, ranks = session
    model = full[preset]
    model.zero_grad()
    loss = model(_inputs(model.config, labels=True)).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads
    for r, rank in enumerate(ranks):
        torch.testing.assert_close(rank[f"{preset}/loss"], loss.detach(), atol=TOL, rtol=TOL)
        expected = shard_state_dict(grads, model.config, TP, r)
        assert set(rank[f"{preset}/grads"]) == set(expected)
        for name, grad in expected.items():
            torch.testing.assert_close(rank[f"{preset}/grads"][name], grad, atol=TOL, rtol=1e-3, msg=name)


@pytest.mark.parametrize("kind", ["ours", "hf"])
def test_sharded_checkpoint_loading_gives_the_single_process_shards(session, kind):
    full, ranks = session
    state = full["tiny-d"].state_dict()
    for r, rank in enumerate(ranks):
        expected = shard_state_dict(state, full["tiny-d"].config, TP, r)
        loaded = rank[f"load/{kind}"]
        assert set(loaded) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(loaded[name], tensor), name


def test_world_size_mismatch_and_a_rank_failing_to_load_raise_on_every_rank(session):
    _, ranks = session
    for r, rank in enumerate(ranks):
        assert "tp=3" in rank["mismatch"] and "2 processes" in rank["mismatch"]
        assert "load_failure" in rank, f"rank {r} did not raise"
        assert rank["after_failure"] == TP
    assert "FileNotFoundError" in ranks[1]["load_failure"]  # the failing rank: its own error
    assert "failed on rank(s) 1" in ranks[0]["load_failure"]  # the others: which rank failed


def test_a_tp_size_that_does_not_divide_is_a_value_error():
    with pytest.raises(ValueError, match="query heads"):
        build_model("tiny-d", device="meta", tp=4)  # 2 LLM query heads
    with pytest.raises(ValueError, match="dummy heads"):
        check_tp(NVLMConfig.from_preset("nvlm-d-72b"), 3)  # 25 + 7 ViT heads
    with pytest.raises(ValueError, match="positive int"):
        TPGroup.resolve(0)
    for preset in ("nvlm-d-72b", "nvlm-x-34b", "nvlm-h-72b"):
        check_tp(NVLMConfig.from_preset(preset), 8)


@pytest.mark.parametrize("preset", ["nvlm-d-72b", "nvlm-x-72b", "nvlm-h-72b"])
def test_72b_weights_per_rank_at_tp8_fit_24gb_in_bf16(preset):
    per_rank = parameter_counts(preset, tp=8)["total"]
    whole = parameter_counts(preset)["total"]
    assert per_rank * 2 <= 24e9
    assert whole / 8 < per_rank < whole / 7  # replicated norms, the ViT's dummy heads


def test_torchrun_cli_runs_and_profiles_on_two_ranks_and_rejects_a_world_size_mismatch(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1"), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port"]
    run = ["-m", "nvlm", "run", "--preset", "tiny-d", "--max-new-tokens", "2", "--quiet", "--device", "cpu"]
    done = subprocess.run(
        [*base, str(_free_port()), *run, "--tp", "2"], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("generated text:") == 1  # only rank 0 prints
    trace = tmp_path / "trace.json"
    profile = [*run[:2], "profile", *run[3:], "--warmup", "0", "--trace", str(trace)]
    done = subprocess.run(
        [*base, str(_free_port()), *profile, "--tp", "2"], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "trace.rank0.json").is_file() and (tmp_path / "trace.rank1.json").is_file()
    bad = subprocess.run(
        [*base, str(_free_port()), *run, "--tp", "3"], env=env, capture_output=True, text=True, timeout=180
    )
    assert bad.returncode != 0
    assert "--tp 3" in bad.stderr and "2 processes" in bad.stderr


if __name__ == "__main__":  # a rank of the session: test_parallel.py session WORLD PORT WORKDIR RANK
    _, _, world_arg, port_arg, workdir_arg, rank_arg = sys.argv
    _session(int(rank_arg), int(world_arg), int(port_arg), workdir_arg)
