"""Wall time per model stage, taken from the NVTX ranges the model already opens.

    with StageTimer(sync=device.type == "cuda") as timer:
        output = model.generate(processor(conversation, images), max_new_tokens=32)
    print(timer.table())

``StageTimer`` registers itself as an observer of ``nvlm_kernels._nvtx`` ranges, so it needs no
hooks of its own in the model and costs nothing when no timer is active. A stage is a range label
(or, for cross-attention, a label prefix); nested occurrences of a stage's own label are counted
once, from the outermost enter to its exit. Top-level stages are timed exclusively (when one
encloses another, the enclosed time is the inner stage's only), so they and "other" add up to the
total. Cross-attention blocks run inside the LLM prefill and decode: their row is a part of those,
not an addition to the total.

CUDA work is asynchronous: with ``sync=True`` the timer synchronizes the device when a stage starts
and ends (only there, so the kernels inside a stage still overlap their launches), which makes the
times the device's and not the launch queue's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from nvlm_kernels import _nvtx


@dataclass(frozen=True)
class Stage:
    name: str  # what the table shows
    label: str  # the range label, or its prefix when ``prefix`` is set
    prefix: bool = False
    nested_in: str | None = None  # shown as a part of other stages' time, not added to the total


STAGES: tuple[Stage, ...] = (
    Stage("preprocess", "nvlm.preprocess"),
    Stage("ViT", "nvlm.vision"),
    Stage("pixel shuffle + projector", "nvlm.projector"),
    Stage("LLM prefill", "nvlm.llm.prefill"),
    Stage("decode", "nvlm.generate.step"),
    Stage("cross-attention", "nvlm.xattn.layer[", prefix=True, nested_in="LLM prefill + decode"),
)


@dataclass
class StageTime:
    seconds: float = 0.0
    calls: int = 0  # outermost occurrences (decode: one per generated token)


class StageTimer:
    """Context manager: while active, accumulates the wall time of each stage in ``STAGES``.
    ``times[name]`` holds seconds and calls; ``total`` the time the timer was active."""

    def __init__(self, *, sync: bool = False, stages: tuple[Stage, ...] = STAGES) -> None:
        self.sync = sync
        self.stages = stages
        self.times: dict[str, StageTime] = {stage.name: StageTime() for stage in stages}
        self.total = 0.0
        self._stage_of_label: dict[str, Stage | None] = {}
        self._depth: dict[str, int] = {stage.name: 0 for stage in stages}
        self._started: dict[str, float] = {}  # the nested-in stages' start times
        self._running: list[str] = []  # top-level stages entered and not left, outermost first
        self._last_boundary = 0.0
        self._timer_started = 0.0

    # ---------------------------------------------------------------------------------------------

    def __enter__(self) -> StageTimer:
        self._synchronize()
        self._timer_started = time.perf_counter()
        _nvtx.add_observer(self)
        return self

    def __exit__(self, *exc: object) -> bool:
        _nvtx.remove_observer(self)
        self._synchronize()
        self.total += time.perf_counter() - self._timer_started
        return False

    # ---------------------------------------------------------------------------------------------
    # range observer (called by nvlm_kernels._nvtx for every range, the ops' own included)

    def _stage(self, label: str) -> Stage | None:
        # Memoized: a run enters thousands of ranges with a few dozen distinct labels.
        try:
            return self._stage_of_label[label]
        except KeyError:
            match = next(
                (s for s in self.stages if (label.startswith(s.label) if s.prefix else label == s.label)), None
            )
            self._stage_of_label[label] = match
            return match

    def range_enter(self, label: str) -> None:
        stage = self._stage(label)
        if stage is None:
            return
        depth = self._depth[stage.name]
        self._depth[stage.name] = depth + 1
        if depth:  # a nested occurrence of the stage's own label: already timed
            return
        self._synchronize()
        now = time.perf_counter()
        if stage.nested_in is not None:
            self._started[stage.name] = now
            return
        self._charge_running_stage(now)
        self._running.append(stage.name)

    def range_exit(self, label: str) -> None:
        stage = self._stage(label)
        if stage is None or self._depth[stage.name] == 0:  # a range entered before the timer was
            return
        self._depth[stage.name] -= 1
        if self._depth[stage.name]:
            return
        self._synchronize()
        now = time.perf_counter()
        record = self.times[stage.name]
        record.calls += 1
        if stage.nested_in is not None:
            record.seconds += now - self._started.pop(stage.name)
            return
        self._charge_running_stage(now)
        self._running.remove(stage.name)

    def _charge_running_stage(self, now: float) -> None:
        """Top-level stages are timed exclusively: the time since the last stage boundary goes to
        the innermost running one, so a stage that encloses another (a prefill range around the
        ViT, say) does not count the inner one's time twice."""
        if self._running:
            self.times[self._running[-1]].seconds += now - self._last_boundary
        self._last_boundary = now

    def _synchronize(self) -> None:
        if self.sync:
            torch.cuda.synchronize()

    # ---------------------------------------------------------------------------------------------

    def table(self) -> str:
        """The per-stage times as an aligned text table (ms, share of the total, calls)."""
        rows = []
        for stage in self.stages:
            record = self.times[stage.name]
            name = stage.name if stage.nested_in is None else f"  {stage.name} (within {stage.nested_in})"
            rows.append((name, record.seconds, record.calls))
        other = self.total - sum(self.times[s.name].seconds for s in self.stages if s.nested_in is None)
        rows.append(("other (tokenizing, input checks, bookkeeping)", max(other, 0.0), None))
        width = max(len(name) for name, _, _ in rows + [("total", 0, None)])
        lines = [f"{'stage':<{width}}  {'ms':>10}  {'share':>6}  calls"]
        for name, seconds, calls in rows:
            share = f"{100 * seconds / self.total:5.1f}%" if self.total > 0 else "     -"
            lines.append(f"{name:<{width}}  {seconds * 1e3:10.2f}  {share:>6}  {'' if calls is None else calls}")
        lines.append(f"{'total':<{width}}  {self.total * 1e3:10.2f}  {'100.0%':>6}")
        return "\n".join(lines)
