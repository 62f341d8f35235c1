"""The ``nvlm`` command line (run, profile, errors), NVTX ranges off/on, and StageTimer's accounting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nvlm
import nvlm_kernels as nk
from nvlm import cli
from nvlm.checkpoint import save_checkpoint
from nvlm.config import NVLMConfig
from nvlm.profiling import StageTimer
from nvlm_kernels import _nvtx

REPO = Path(__file__).resolve().parents[2]
TINY = NVLMConfig.from_preset("tiny-d")
# The bundled 720x480 image at the tiny presets' limit of 4 tiles: 2 x 2 + thumbnail.
TILES = 5
TOKENS_PER_TILE = TINY.tokens_per_tile  # 4
TAG_TOKENS = len("<tile_1>")  # the byte tokenizer spells a tile tag byte by byte (NVLM-H keys hold it)
XATTN_BLOCKS = 2  # tiny LLM: 4 layers, a block before every 2nd


@pytest.fixture
def ranges_off():
    """Whatever NVLM_NVTX said when the suite started: ranges off, no observer, restored after."""
    was_enabled = _nvtx.is_enabled()
    _nvtx.disable()
    assert not _nvtx._observers
    yield
    _nvtx.enable(was_enabled)


@pytest.fixture
def recorded_pushes(monkeypatch):
    """The labels pushed to NVTX (also where the nvtx package is absent)."""
    pushes = []
    monkeypatch.setattr(_nvtx, "_domain", object())
    monkeypatch.setattr(_nvtx, "push", pushes.append)
    monkeypatch.setattr(_nvtx, "pop", lambda: None)
    return pushes


def _section(output: str, title: str) -> list[str]:
    """The indented lines under ``title:`` in the report."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    body = []
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        body.append(line.strip())
    return body


def _token_counts(output: str) -> dict[str, int]:
    return {line.rsplit(None, 1)[0].strip(): int(line.rsplit(None, 1)[1]) for line in _section(output, "tokens:")}


def _stage_calls(output: str) -> dict[str, int]:
    """Stage name -> calls, from the stage table (rows with a calls column)."""
    calls = {}
    for line in _section(output, "stage times:")[1:]:
        name, rest = line.split("  ", 1)
        fields = rest.split()
        if len(fields) == 3:  # ms, share, calls
            calls[name] = int(fields[2])
    return calls


# --------------------------------------------------------------------------------------------------
# nvlm run / nvlm profile


@pytest.mark.parametrize(
    ("preset", "decoder_image_tokens", "cross_attention_keys"),
    [
        ("tiny-d", TILES * TOKENS_PER_TILE, 0),  # every tile in the decoder
        ("tiny-x", 0, TILES * TOKENS_PER_TILE),  # every tile, thumbnail too, as keys
        ("tiny-h", TOKENS_PER_TILE, (TILES - 1) * (TOKENS_PER_TILE + TAG_TOKENS)),  # thumbnail / regular tiles
    ],
)
def test_run_reports_plan_tokens_text_and_stage_times(capsys, preset, decoder_image_tokens, cross_attention_keys):
    assert cli.main(["run", "--preset", preset, "--max-new-tokens", "3", "--quiet"]) == 0
    out = capsys.readouterr().out

    assert _section(out, "tile plan:") == [
        "image 1 example.png (720x480): grid 2x2 (cols x rows) -> 4 tiles + thumbnail = 5 tiles of 56x56"
    ]
    counts = _token_counts(out)
    assert counts["tiles (preprocess)"] == TILES
    assert counts["ViT tokens (tiles x (patches + CLS))"] == TILES * (16 + 1)
    assert counts["of which image tokens"] == decoder_image_tokens
    assert counts["cross-attention keys"] == cross_attention_keys
    generated = counts["generated tokens (decode)"]
    assert 1 <= generated <= 3
    assert len(_section(out, "generated text:")) == 1

    calls = _stage_calls(out)
    assert calls["preprocess"] == calls["ViT"] == calls["pixel shuffle + projector"] == calls["LLM prefill"] == 1
    assert calls["decode"] == generated - 1  # the prefill yields the first token
    blocks = XATTN_BLOCKS if preset != "tiny-d" else 0
    assert calls["cross-attention (within LLM prefill + decode)"] == blocks * generated
    assert any(line.startswith("total") for line in _section(out, "stage times:"))


def test_profile_writes_a_chrome_trace_with_the_model_and_op_ranges(tmp_path, capsys, ranges_off):
    trace = tmp_path / "traces" / "trace.json"
    assert cli.main(["profile", "--preset", "tiny-h", "--trace", str(trace), "--max-new-tokens", "3", "--quiet"]) == 0
    names = {event.get("name") for event in json.loads(trace.read_text())["traceEvents"]}
    expected = {
        "nvlm.preprocess", "nvlm.vision.layer[0]", "nvlm.vision.attention", "nvlm.projector", "nvlm.llm.layer[0]",
        "nvlm.xattn.layer[0]", "nvlm.llm.prefill", "nvlm.generate.step",
        "nvlm.kernels.vit_qk_norm_attention.fwd", "nvlm.kernels.gated_cross_attention.fwd",
    }  # fmt: skip
    assert expected <= names
    out = capsys.readouterr().out
    assert str(trace) in out
    assert "stage times:" in out
    assert not _nvtx.is_enabled()  # profile turned ranges on for its run only


def test_run_from_our_checkpoint_takes_the_config_from_it(tmp_path, capsys):
    torch.manual_seed(0)
    model = nvlm.build_model("tiny-x")
    save_checkpoint(model, tmp_path, config=model.config)
    assert cli.main(["run", "--checkpoint", str(tmp_path), "--max-new-tokens", "2", "--quiet"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("tiny-x (NVLM-X") and f"checkpoint {tmp_path}" in header


def _byte_level_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer without merges (256 byte symbols + the ChatML and image specials,
    inside tiny-d's vocabulary of 320), saved as a Hugging Face tokenizer next to the weights, as
    NVLM-D-72B ships Qwen2.5's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_pad|>"])
    PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    ).save_pretrained(directory)


def test_run_from_a_hugging_face_nvlm_d_directory_goes_through_from_pretrained(tmp_path, capsys, hf_layout):
    """``nvlm run --checkpoint DIR`` on a directory laid out as nvidia/NVLM-D-72B (config.json in the
    released schema, shards, its tokenizer): no --preset, no --tokenizer; it generates what the
    model built and loaded by hand generates."""
    pytest.importorskip("transformers", reason="the checkpoint's own tokenizer is read with transformers")
    pytest.importorskip("tokenizers", reason="the test tokenizer is built with tokenizers")
    torch.manual_seed(0)
    by_hand = nvlm.build_model(TINY).eval()
    with torch.no_grad():  # matrices of std 1.5/sqrt(fan-in): greedy decoding then varies its tokens
        for param in by_hand.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 1.5 * param.shape[-1] ** -0.5)
    ours = {name: t.detach().clone() for name, t in by_hand.state_dict().items()}
    directory = hf_layout.write(tmp_path / "NVLM-D-tiny", hf_layout.to_hf(ours, TINY))
    (directory / "config.json").write_text(json.dumps(hf_layout.tiny_d_config()))
    _byte_level_tokenizer(directory)

    argv = ["run", "--checkpoint", str(directory), "--max-new-tokens", "4", "--quiet", "--dtype", "float32"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert header.startswith("NVLM-D-tiny (NVLM-D, ") and f"checkpoint {directory}" in header

    args = cli.build_parser().parse_args(argv)
    args.warmup = 0
    request = cli._check_request(args)
    assert request.tokenizer_dir == directory and request.pretrained
    tokenizer = cli.load_tokenizer(request)
    processor = nvlm.NVLMProcessor(tokenizer, request.config)
    _, output = cli.generate_once(by_hand, processor, tokenizer, request, args)
    generated = output.sequences[0, : int(output.lengths[0])].tolist()
    assert len(set(generated)) > 1  # not one token repeated: the comparison below can tell models apart
    assert "generated text:\n  " + cli.printable(cli.decode_generated(tokenizer, generated)) + "\n" in out


def test_a_bad_hugging_face_config_value_is_one_error_line(tmp_path, capsys, hf_layout):
    ours = {name: t.detach() for name, t in nvlm.build_model(TINY).state_dict().items()}
    directory = hf_layout.write(tmp_path / "hf", hf_layout.to_hf(ours, TINY))
    (directory / "config.json").write_text(json.dumps(hf_layout.tiny_d_config(select_layer=-2)))
    assert cli.main(["run", "--checkpoint", str(directory), "--tokenizer", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nvlm run: error: --checkpoint") and "select_layer = -2" in lines[0]


def test_checkpoint_layout_is_told_by_tensor_names(tmp_path):
    def index(directory: Path, names: list[str]) -> Path:
        directory.mkdir()
        weight_map = dict.fromkeys(names, "model-00001-of-00001.safetensors")
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return directory

    hf = index(tmp_path / "hf", ["vision_model.embeddings.class_embedding", "language_model.lm_head.weight"])
    ours = index(tmp_path / "ours", ["vision.embeddings.class_embedding", "llm.lm_head.weight"])
    other = index(tmp_path / "other", ["transformer.h.0.attn.weight"])
    assert cli._checkpoint_kind(hf) == "hf-nvlm-d"
    assert cli._checkpoint_kind(ours) == "ours"
    with pytest.raises(cli.CLIError, match="neither our layout nor Hugging Face NVLM-D"):
        cli._checkpoint_kind(other)


def test_nsight_command_lines_repeat_this_run_with_nvtx(tmp_path):
    image = tmp_path / "cat.png"
    image.write_bytes(cli.example_image_path().read_bytes())
    args = cli.build_parser().parse_args(
        ["profile", "--preset", "tiny-d", "--image", str(image), "--trace", str(tmp_path / "t.json"), "--seed", "3"]
    )
    args.warmup = 1
    request = cli._check_request(args)
    nsys, ncu_vit, ncu_attention = (line.split() for line in cli.nsight_commands(args, request))
    assert nsys[:3] == ["nsys", "profile", "--trace=cuda,nvtx"]
    assert ncu_vit[ncu_vit.index("--nvtx-include") + 1] == "nvlm@nvlm.vision/"
    assert ncu_attention[ncu_attention.index("--nvtx-include") + 1] == "nvlm@nvlm.kernels.vit_qk_norm_attention.fwd/"
    # the profiled program is `python -m nvlm run ...` with this run's options and NVTX on
    run = nsys[nsys.index("-m") + 2 :]
    rerun = cli.build_parser().parse_args(run)
    assert (rerun.command, rerun.preset, rerun.image, rerun.seed, rerun.nvtx) == (
        "run", "tiny-d", [str(image)], 3, True
    )  # fmt: skip
    assert cli.build_parser().parse_args(ncu_vit[ncu_vit.index("-m") + 2 :]).max_new_tokens == 1


# --------------------------------------------------------------------------------------------------
# bad input: one line, exit status 2


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _bad_input_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a PNG")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    return [
        (["--preset", "tiny-q"], "unknown preset 'tiny-q'"),
        (["--preset", "tiny-d", "--image", str(tmp_path / "missing.png")], "missing.png: no such file"),
        (["--preset", "tiny-d", "--checkpoint", str(empty_dir)], "model.safetensors.index.json"),
        (["--preset", "tiny-d", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (["--preset", "nvlm-d-34b", "--device", "cpu"], "--tokenizer"),
        (["--preset", "tiny-d", "--image", str(not_an_image), "--quiet"], "notes.png"),
    ]


def test_bad_input_is_one_error_line_and_exit_status_2(tmp_path, capsys):
    for arguments, problem in _bad_input_cases(tmp_path):
        assert cli.main(["run", *arguments]) == 2, arguments
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("nvlm run: error: "), captured.err
        assert problem in lines[0]


def test_python_m_nvlm_help_and_console_script_entry():
    scripts = _pyproject()["project"]["scripts"]
    module, function = scripts["nvlm"].split(":")
    assert module == "nvlm.cli" and callable(getattr(cli, function))
    result = subprocess.run(
        [sys.executable, "-m", "nvlm", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "run" in result.stdout and "profile" in result.stdout


def test_example_image_ships_as_package_data():
    patterns = _pyproject()["tool"]["setuptools"]["package-data"]["nvlm"]
    package_dir = Path(nvlm.__file__).parent
    shipped = {path for pattern in patterns for path in package_dir.glob(pattern)}
    assert cli.example_image_path() in shipped


# --------------------------------------------------------------------------------------------------
# NVTX ranges: off by default, on on request, invisible to torch.compile


def test_ranges_are_off_by_default(ranges_off, recorded_pushes):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        with _nvtx.range("nvlm.test.off"):
            nk.pixel_shuffle(torch.randn(1, 16, 4))
    assert recorded_pushes == []
    assert not any(event.name.startswith("nvlm.") for event in profiler.events())


def test_enabled_ranges_reach_nvtx_and_the_torch_profiler(ranges_off, recorded_pushes):
    _nvtx.enable()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        with _nvtx.range("nvlm.test.on"):
            nk.pixel_shuffle(torch.randn(1, 16, 4))
    assert recorded_pushes == ["nvlm.test.on", "nvlm.kernels.pixel_shuffle.fwd"]
    profiled = {event.name for event in profiler.events()}
    assert {"nvlm.test.on", "nvlm.kernels.pixel_shuffle.fwd"} <= profiled


@pytest.mark.parametrize(
    ("value", "enabled"),
    [(None, False), ("", False), ("0", False), ("off", False), ("1", True), (" TRUE ", True), ("on", True)],
)
def test_env_flag_parsing(value, enabled):
    assert _nvtx.parse_env_flag(value) is enabled


def test_unknown_env_flag_warns_and_stays_off():
    with pytest.warns(UserWarning, match="NVLM_NVTX"):
        assert _nvtx.parse_env_flag("verbose") is False


def test_fullgraph_compile_through_enabled_ranges(ranges_off):
    def shuffle_twice(x):
        with _nvtx.range("nvlm.test.compiled"):
            return nk.pixel_shuffle(x) * 2

    _nvtx.enable()
    x = torch.randn(1, 16, 4)
    with StageTimer():  # an observer as well: the compiled graph must not call it either
        compiled = torch.compile(shuffle_twice, fullgraph=True, backend="eager")
        torch.testing.assert_close(compiled(x), shuffle_twice(x))


# --------------------------------------------------------------------------------------------------
# StageTimer


class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_stage_timer_counts_outermost_ranges_and_nested_stages_once(monkeypatch, ranges_off):
    clock = _FakeClock()
    monkeypatch.setattr("nvlm.profiling.time.perf_counter", clock)

    def spend(label: str, seconds: float, inner=()) -> None:
        with _nvtx.range(label):
            clock.now += seconds
            for inner_label, inner_seconds, inner_inner in inner:
                spend(inner_label, inner_seconds, inner_inner)

    with StageTimer() as timer:
        spend("nvlm.preprocess", 1.0)
        # the prefill encloses the ViT (itself nesting its own label) and a cross-attention block
        vision = ("nvlm.vision", 2.0, [("nvlm.vision", 0.5, []), ("nvlm.vision.layer[0]", 0.5, [])])
        spend("nvlm.llm.prefill", 4.0, [vision, ("nvlm.xattn.layer[0]", 1.0, [])])
        clock.now += 0.25  # sampling: no stage
        for _ in range(2):
            spend("nvlm.generate.step", 0.5, [("nvlm.xattn.layer[2]", 0.25, [])])
    seconds = {name: record.seconds for name, record in timer.times.items()}
    calls = {name: record.calls for name, record in timer.times.items()}
    assert seconds["ViT"] == 3.0 and calls["ViT"] == 1  # 2 + its nested 0.5 + 0.5, counted once
    assert seconds["LLM prefill"] == 5.0  # 4 + the block's 1, without the ViT's 3
    assert seconds["decode"] == 1.5 and calls["decode"] == 2
    assert seconds["cross-attention"] == 1.5 and calls["cross-attention"] == 3
    assert timer.total == 10.75
    other = next(line for line in timer.table().splitlines() if line.startswith("other"))
    assert float(other.split()[-2]) == pytest.approx(250.0)  # total minus the top-level stages, in ms
    assert _nvtx._observers == []


def test_stage_timer_ignores_ranges_it_did_not_see_open(ranges_off):
    _nvtx.enable()
    outer = _nvtx.range("nvlm.llm.prefill")
    outer.__enter__()
    with StageTimer() as timer:
        outer.__exit__(None, None, None)
    assert timer.times["LLM prefill"].calls == 0
