"""The public API of ``nvlm_kernels.integrations.transformers`` and the machinery every family
uses: dispatch and its errors (a model we do not support, a non-Module, an option that does not
apply), PatchReport's text, instance-level and class-level patching with exact revert and
idempotence (on toy nn.Module subclasses defined here, never on torch.nn classes), the context
manager, and that ``import nvlm_kernels`` never imports transformers."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from nvlm_kernels.integrations import transformers as integration
from nvlm_kernels.integrations.transformers import _patching
from nvlm_kernels.integrations.transformers._patching import PATCHED_ATTR, PatchReport

NEEDS_TRANSFORMERS = "the transformers models are built from Hugging Face transformers"


# --------------------------------------------------------------------------------------------------
# toy modules (never torch.nn's own classes)


class Child(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((3,), 2.0))

    def forward(self, x):
        return x * self.scale

    def describe(self) -> str:
        return "child"


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.child = Child()

    def forward(self, x):
        return self.child(self.lin(x))

    def describe(self) -> str:
        return "toy"


class Base(nn.Module):
    def describe(self) -> str:
        return "base"


class Inherits(Base):  # describe comes from Base (not in its own __dict__)
    pass


class Overrides(Base):
    def describe(self) -> str:
        return "overrides"


def _patched_describe(self) -> str:
    return f"patched {type(self).__name__}"


def _doubled_forward(self, x):
    return 2 * type(self).forward(self, x)


# --------------------------------------------------------------------------------------------------
# import: transformers stays optional


def test_import_nvlm_kernels_does_not_import_transformers():
    code = textwrap.dedent(
        """
        import sys
        import nvlm_kernels
        import nvlm_kernels.integrations.transformers
        from nvlm_kernels.integrations.transformers import _attention, _patching, apply_nvlm_kernels
        assert "transformers" not in sys.modules, sorted(m for m in sys.modules if m.startswith("transformers"))
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# --------------------------------------------------------------------------------------------------
# dispatch errors


def test_unsupported_module_is_a_type_error_naming_its_class():
    with pytest.raises(TypeError, match=r"test_transformers_api\.Toy is not a model nvlm_kernels can patch"):
        integration.apply_nvlm_kernels(Toy())
    with pytest.raises(TypeError, match="supported: InternVL, Mllama, NVLM-D"):
        integration.apply_nvlm_kernels(Toy())
    with pytest.raises(TypeError, match="Toy"):
        with integration.nvlm_kernels_patched(Toy()):
            pass


def test_unsupported_transformers_model_is_a_type_error_naming_its_class():
    transformers = pytest.importorskip("transformers", reason=NEEDS_TRANSFORMERS)
    config = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, intermediate_size=128,
        vocab_size=64,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    with pytest.raises(TypeError, match=r"modeling_llama\.LlamaForCausalLM is not a model nvlm_kernels can patch"):
        integration.apply_nvlm_kernels(model)
    assert not any(PATCHED_ATTR in m.__dict__ for m in model.modules())


@pytest.mark.parametrize(
    "thing", ["a string", None, {"vision_config": {}}, torch.zeros(2)], ids=lambda thing: type(thing).__name__
)
def test_non_module_is_a_type_error(thing):
    with pytest.raises(TypeError, match=r"expected a torch\.nn\.Module model, got"):
        integration.apply_nvlm_kernels(thing)


def test_reject_options_names_the_option_and_the_family():
    _patching.reject_options("Toy", {"a": True}, ("a", "b"))  # allowed: no error
    with pytest.raises(TypeError, match=r"option\(s\) c, d do not apply to Toy models \(its options: a, b\)"):
        _patching.reject_options("Toy", {"d": 1, "a": True, "c": 2}, ("a", "b"))
    with pytest.raises(TypeError, match="its options: none"):
        _patching.reject_options("Toy", {"x": 1}, ())


def _tiny_internvl():
    transformers = pytest.importorskip("transformers", reason=NEEDS_TRANSFORMERS)
    vision = dict(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=1, intermediate_size=128, image_size=28,
        patch_size=14, use_qk_norm=True,
    )  # fmt: skip
    text = dict(
        model_type="qwen2", hidden_size=64, num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
        intermediate_size=128, vocab_size=64,
    )  # fmt: skip
    config = transformers.InternVLConfig(vision_config=vision, text_config=text, image_token_id=63, image_seq_length=1)
    return transformers.InternVLForConditionalGeneration(config)


def _tiny_mllama():
    transformers = pytest.importorskip("transformers", reason=NEEDS_TRANSFORMERS)
    vision = dict(
        hidden_size=64, num_hidden_layers=1, num_global_layers=1, attention_heads=1, intermediate_size=128,
        vision_output_dim=128, image_size=28, patch_size=14, max_num_tiles=2, intermediate_layers_indices=[0],
        supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]],
    )  # fmt: skip
    text = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=1, num_key_value_heads=1, intermediate_size=128,
        vocab_size=64, cross_attention_layers=[1], bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    config = transformers.MllamaConfig(vision_config=vision, text_config=text, image_token_index=63)
    return transformers.MllamaForConditionalGeneration(config)


@pytest.mark.parametrize(
    ("build", "family", "foreign"),
    [(_tiny_internvl, "InternVL", {"cross_attention": True}), (_tiny_mllama, "Mllama", {"projector": True})],
    ids=["internvl", "mllama"],
)
def test_options_that_do_not_apply_are_errors_and_patch_nothing(build, family, foreign):
    model = build()
    with pytest.raises(TypeError, match=rf"option\(s\) {next(iter(foreign))} do not apply to {family} models"):
        integration.apply_nvlm_kernels(model, **foreign)
    with pytest.raises(TypeError, match=rf"option\(s\) not_an_option do not apply to {family} models"):
        integration.apply_nvlm_kernels(model, not_an_option=True)
    assert not any(PATCHED_ATTR in m.__dict__ for m in model.modules())  # nothing half-applied


# --------------------------------------------------------------------------------------------------
# PatchReport


def test_patch_report_text_and_merge():
    report = PatchReport(target="Toy (this instance)")
    report.replaced += ["lin: forward -> nk.op", "child: forward -> nk.other"]
    report.unchanged.append("child: describe already patched")
    assert str(report) == "\n".join(
        [
            "nvlm_kernels on Toy (this instance): 2 replaced, 1 unchanged",
            "  replaced  lin: forward -> nk.op",
            "  replaced  child: forward -> nk.other",
            "  unchanged child: describe already patched",
        ]
    )
    other = PatchReport(target="x", replaced=["a: f -> g"], unchanged=["b: h (option off)"])
    assert report.merge(other) is report
    assert report.replaced[-1] == "a: f -> g" and report.unchanged[-1] == "b: h (option off)"
    assert str(PatchReport(target="empty")) == "nvlm_kernels on empty: 0 replaced, 0 unchanged"


# --------------------------------------------------------------------------------------------------
# instance-level patching


def _params(model: nn.Module) -> dict[str, int]:
    return {name: id(p) for name, p in model.named_parameters()}


def _attributes(module: nn.Module) -> dict[str, int]:
    return {name: id(value) for name, value in module.__dict__.items()}


def test_patch_method_shadows_on_one_instance_and_reverts_exactly():
    toy, other = Toy(), Toy()
    before_attrs, before_params, before_keys = _attributes(toy), _params(toy), list(toy.state_dict())
    x = torch.randn(2, 3)
    expected = toy(x).detach()

    report = PatchReport(target="Toy")
    _patching.patch_method(toy, "describe", _patched_describe, report, "toy", "ours")
    _patching.patch_method(toy, "forward", _doubled_forward, report, "toy", "doubled")
    assert report.replaced == ["toy: describe -> ours", "toy: forward -> doubled"] and report.unchanged == []
    assert toy.describe() == "patched Toy" and other.describe() == "toy"  # this instance only
    assert Toy.__dict__["describe"] is Toy.describe and "describe" not in other.__dict__
    torch.testing.assert_close(toy(x), 2 * expected)  # nn.Module.__call__ runs the instance's forward
    assert _patching.is_patched(toy) and _patching.is_patched(toy, "forward") and not _patching.is_patched(other)
    assert _params(toy) == before_params and list(toy.state_dict()) == before_keys  # parameters untouched

    again = PatchReport(target="Toy")  # idempotent: a second patch changes nothing and says so
    _patching.patch_method(toy, "describe", lambda self: "third", again, "toy", "other")
    assert again.replaced == [] and again.unchanged == ["toy: describe already patched"]
    assert toy.describe() == "patched Toy"

    assert sorted(_patching.revert_module(toy)) == ["describe", "forward"]
    assert _attributes(toy) == before_attrs  # exactly as before: no attribute left behind
    assert toy.describe() == "toy" and toy.describe.__func__ is Toy.describe
    torch.testing.assert_close(toy(x), expected)
    assert _patching.revert_module(toy) == []  # nothing left to revert


def test_patch_method_restores_an_existing_instance_attribute():
    toy = Toy()
    own = lambda: "instance's own"  # noqa: E731 - an attribute set on the instance before we patch
    object.__setattr__(toy, "describe", own)
    _patching.patch_method(toy, "describe", _patched_describe, PatchReport("Toy"), "toy", "ours")
    assert toy.describe() == "patched Toy"
    _patching.revert_module(toy)
    assert toy.__dict__["describe"] is own


def test_revert_model_walks_every_submodule():
    toy = Toy()
    report = PatchReport(target="Toy")
    _patching.patch_method(toy, "describe", _patched_describe, report, "", "ours")
    _patching.patch_method(toy.child, "describe", _patched_describe, report, "child", "ours")
    _patching.patch_method(toy.child, "forward", _doubled_forward, report, "child", "doubled")
    assert toy.child.describe() == "patched Child"
    restored = _patching.revert_model(toy)
    assert sorted(restored) == ["Toy: describe", "child: describe", "child: forward"]
    assert toy.child.describe() == "child" and not any(PATCHED_ATTR in m.__dict__ for m in toy.modules())
    assert integration.revert_nvlm_kernels(toy) == []  # the public revert: nothing left


def test_deepcopy_of_a_patched_model_is_independent():
    toy = Toy()
    _patching.patch_method(toy, "describe", _patched_describe, PatchReport("Toy"), "toy", "ours")
    twin = copy.deepcopy(toy)  # e.g. an EMA copy: its patch is bound to the copy, reverted on its own
    assert twin.describe() == "patched Toy" and twin.describe.__self__ is twin
    _patching.revert_model(toy)
    assert toy.describe() == "toy" and twin.describe() == "patched Toy"
    assert _patching.revert_model(twin) == ["Toy: describe"] and twin.describe() == "toy"


# --------------------------------------------------------------------------------------------------
# class-level patching


@pytest.fixture
def clean_classes():
    yield
    _patching.revert_classes((Base, Inherits, Overrides, Toy, Child))


def test_patch_class_reaches_every_instance_and_reverts_exactly(clean_classes):
    existing = Overrides()
    original = Overrides.__dict__["describe"]
    report = PatchReport(target="classes")
    _patching.patch_class(Overrides, "describe", _patched_describe, report, "ours")
    assert report.replaced == ["Overrides.describe -> ours (class level)"]
    assert existing.describe() == "patched Overrides" and Overrides().describe() == "patched Overrides"
    assert Base().describe() == "base" and Inherits().describe() == "base"  # other classes untouched
    assert (Overrides, "describe") in _patching.class_patches()
    assert _patching.unpatched_attribute(Overrides, "describe") is original  # what a replacement calls

    again = PatchReport(target="classes")
    _patching.patch_class(Overrides, "describe", lambda self: "third", again, "other")
    assert again.replaced == [] and again.unchanged == ["Overrides.describe already patched (class level)"]
    assert existing.describe() == "patched Overrides"

    assert _patching.revert_classes((Overrides,)) == ["Overrides.describe"]
    assert Overrides.__dict__["describe"] is original and existing.describe() == "overrides"
    assert (Overrides, "describe") not in _patching.class_patches()


def test_patch_class_of_an_inherited_method_reverts_to_inheritance(clean_classes):
    _patching.patch_class(Inherits, "describe", _patched_describe, PatchReport("classes"), "ours")
    assert Inherits().describe() == "patched Inherits" and Base().describe() == "base"
    assert _patching.unpatched_attribute(Inherits, "describe") is Base.__dict__["describe"]
    _patching.revert_classes((Inherits,))
    assert "describe" not in Inherits.__dict__ and Inherits().describe() == "base"


def test_revert_classes_filter_and_instance_patch_over_class_patch(clean_classes):
    report = PatchReport("classes")
    _patching.patch_class(Inherits, "describe", _patched_describe, report, "ours")
    _patching.patch_class(Overrides, "describe", _patched_describe, report, "ours")
    one = Overrides()
    _patching.patch_method(one, "describe", lambda self: "instance", report, "one", "instance")
    assert one.describe() == "instance" and Overrides().describe() == "patched Overrides"
    assert _patching.revert_classes((Inherits,)) == ["Inherits.describe"]
    assert Inherits().describe() == "base" and Overrides().describe() == "patched Overrides"  # the other stays
    _patching.revert_module(one)
    assert one.describe() == "patched Overrides"
    assert "Overrides.describe" in integration.revert_nvlm_kernels()  # the public form: every class patch
    assert one.describe() == "overrides"


# --------------------------------------------------------------------------------------------------
# the public API on a real family: idempotence, context manager, nothing of torch.nn patched


def _nn_classes_state():
    return {cls: dict(vars(cls)) for cls in (nn.Module, nn.Linear, nn.LayerNorm, nn.Conv2d, nn.Embedding)}


def test_apply_is_idempotent_and_the_context_manager_reverts():
    model = _tiny_internvl()
    nn_before, params = _nn_classes_state(), _params(model)
    first = integration.apply_nvlm_kernels(model)
    assert first.replaced, str(first)
    second = integration.apply_nvlm_kernels(model)
    assert second.replaced == [] and all("already patched" in line for line in second.unchanged), str(second)
    assert _params(model) == params and _nn_classes_state() == nn_before
    integration.revert_nvlm_kernels(model)
    assert not any(PATCHED_ATTR in m.__dict__ for m in model.modules())

    with pytest.raises(RuntimeError, match="inside"):
        with integration.nvlm_kernels_patched(model) as report:
            assert report.replaced and any(PATCHED_ATTR in m.__dict__ for m in model.modules())
            raise RuntimeError("inside")
    assert not any(PATCHED_ATTR in m.__dict__ for m in model.modules())  # reverted on the way out


def test_class_level_patch_touches_only_the_familys_classes():
    model = _tiny_internvl()  # imports transformers' InternVL module
    from nvlm_kernels.integrations.transformers import _internvl

    nn_before = _nn_classes_state()
    before = set(_patching.class_patches())
    try:
        report = integration.apply_nvlm_kernels_to_internvl()
        added = set(_patching.class_patches()) - before
        assert report.replaced and added
        assert {cls for cls, _ in added} <= set(_internvl.classes())
        assert all(cls.__module__.startswith("transformers.models.internvl") for cls, _ in added)
        assert _nn_classes_state() == nn_before
        assert not any(PATCHED_ATTR in m.__dict__ for m in model.modules())  # class level: no instance patch
    finally:
        _patching.revert_classes(tuple(_internvl.classes()))
    assert set(_patching.class_patches()) == before
