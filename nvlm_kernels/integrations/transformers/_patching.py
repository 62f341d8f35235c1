"""The patching machinery every model family shares: replacing a method on one module instance or
on a class, remembering what was there so that ``revert`` restores it exactly, never patching twice
(a second ``apply`` reports "already patched"), and the report ``apply`` returns.

Only methods of the model's own classes (and of the instances in a model) are ever replaced: never
``torch.nn`` classes, never another model's classes, never module-level functions of transformers.
Parameters and buffers are never touched: names, checkpoints and optimizers see the same tensors.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable

from torch import nn

PATCHED_ATTR = "_nvlm_kernels_patched"  # on a patched module: {method name: what its __dict__ held before}


class _Missing:
    """The sentinel for "nothing was there": it stays itself through ``copy.deepcopy`` and pickle,
    so a copied patched model (an EMA copy, say) reverts to the class's method, not to a copy of it."""

    def __repr__(self) -> str:
        return "<missing>"

    def __copy__(self) -> _Missing:
        return self

    def __deepcopy__(self, memo) -> _Missing:
        return self

    def __reduce__(self) -> str:
        return "_MISSING"


_MISSING = _Missing()

# (class, method name) -> what the class's __dict__ held before the class-level patch
_class_patches: dict[tuple[type, str], object] = {}


@dataclasses.dataclass
class PatchReport:
    """What one ``apply`` call did: ``replaced`` lists "path: method -> what runs now" lines,
    ``unchanged`` lists what was left alone and why (already patched, an option turned off, a
    module our ops cannot serve)."""

    target: str
    replaced: list[str] = dataclasses.field(default_factory=list)
    unchanged: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"nvlm_kernels on {self.target}: {len(self.replaced)} replaced, {len(self.unchanged)} unchanged"]
        lines += [f"  replaced  {line}" for line in self.replaced]
        lines += [f"  unchanged {line}" for line in self.unchanged]
        return "\n".join(lines)

    def merge(self, other: PatchReport) -> PatchReport:
        self.replaced += other.replaced
        self.unchanged += other.unchanged
        return self


def patch_method(
    module: nn.Module, name: str, replacement: Callable, report: PatchReport, path: str, what: str
) -> None:
    """``module.<name>`` becomes ``replacement`` bound to ``module`` (an instance attribute that
    shadows the class's method), once; ``revert_module`` puts back what was there."""
    patched = module.__dict__.get(PATCHED_ATTR)
    if patched is not None and name in patched:
        report.unchanged.append(f"{path}: {name} already patched")
        return
    module.__dict__.setdefault(PATCHED_ATTR, {})[name] = module.__dict__.get(name, _MISSING)
    object.__setattr__(module, name, types.MethodType(replacement, module))
    report.replaced.append(f"{path}: {name} -> {what}")


def is_patched(module: nn.Module, name: str | None = None) -> bool:
    patched = module.__dict__.get(PATCHED_ATTR)
    return bool(patched) and (name is None or name in patched)


def revert_module(module: nn.Module) -> list[str]:
    """Undo ``patch_method`` on one module; returns the method names restored."""
    patched = module.__dict__.pop(PATCHED_ATTR, None)
    if not patched:
        return []
    for name, previous in patched.items():
        if previous is _MISSING:
            module.__dict__.pop(name, None)
        else:
            object.__setattr__(module, name, previous)
    return list(patched)


def revert_model(model: nn.Module) -> list[str]:
    """Undo every instance-level patch in ``model``; returns "path: method" lines."""
    restored = []
    for path, module in model.named_modules():
        restored += [f"{path or type(model).__name__}: {name}" for name in revert_module(module)]
    return restored


def patch_class(cls: type, name: str, replacement: Callable, report: PatchReport, what: str) -> None:
    """``cls.<name>`` becomes ``replacement`` for every instance, existing and future, once."""
    key = (cls, name)
    if key in _class_patches:
        report.unchanged.append(f"{cls.__name__}.{name} already patched (class level)")
        return
    _class_patches[key] = cls.__dict__.get(name, _MISSING)
    setattr(cls, name, replacement)
    report.replaced.append(f"{cls.__name__}.{name} -> {what} (class level)")


def class_patches() -> list[tuple[type, str]]:
    return list(_class_patches)


def unpatched_attribute(cls: type, name: str):
    """What ``cls.<name>`` is without our class-level patches (through the MRO): the function an
    instance- or class-level replacement calls to run the model's own code (or another library's
    patch of it), never one of ours twice."""
    for klass in cls.__mro__:
        if (klass, name) in _class_patches:
            previous = _class_patches[(klass, name)]
            if previous is not _MISSING:
                return previous
        elif name in klass.__dict__:
            return klass.__dict__[name]
    raise AttributeError(f"{cls.__name__} has no attribute {name!r}")


def revert_classes(classes: tuple[type, ...] | None = None) -> list[str]:
    """Undo class-level patches (of ``classes``, or all); returns "Class.method" lines."""
    restored = []
    for cls, name in list(_class_patches):
        if classes is not None and cls not in classes:
            continue
        previous = _class_patches.pop((cls, name))
        if previous is _MISSING:
            delattr(cls, name)
        else:
            setattr(cls, name, previous)
        restored.append(f"{cls.__name__}.{name}")
    return restored


def reject_options(family: str, options: dict, allowed: tuple[str, ...]) -> None:
    """An option that does not apply to this model family is an error, never silently ignored."""
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(
            f"apply_nvlm_kernels: option(s) {', '.join(unknown)} do not apply to {family} models "
            f"(its options: {', '.join(allowed) or 'none'})"
        )
