"""The engine core: one step is schedule, execute, update (vLLM's `EngineCore.step`).

    plan = scheduler.schedule()               which sequences, which slots, which tokens (no tensors)
    runner.execute(plan, result)              the tensors, the model, sampling (no decisions)
    outputs = scheduler.update(plan, result)  tokens recorded, finished sequences' slots freed

The engine thread (`engine.py`) calls `step` and turns its outputs into stream deltas; tests and
benchmarks drive an EngineCore directly, without threads or HTTP.

A step that raises (e.g. out of memory) still records what it computed before the error (a
scoring request answered at admission, a decode call's tokens) in `outputs`, then re-raises; the
running sequences' slots are then forgotten by the prefix cache, since what they hold is unknown.
"""

from __future__ import annotations

from ..model import KVCache, Transformer
from .config import ServeConfig
from .runner import ModelRunner
from .scheduler import Scheduler, Sequence, SchedulerStats, StepOutput, StepResult


class EngineCore:
    def __init__(self, net: Transformer, config: ServeConfig | None = None, draft: Transformer | None = None) -> None:
        self.serve_config = config = config or ServeConfig()
        self.runner = ModelRunner(net, config, draft)
        self.scheduler = Scheduler(config, self.runner, net.config.max_seq_len)
        self.config = net.config
        self.outputs: list[StepOutput] = []  # what the last step produced (so far, if it raised)

    # What the engine and tests read of the scheduler and the cache.
    @property
    def cache(self) -> KVCache:
        return self.runner.cache

    @property
    def stats(self) -> SchedulerStats:
        return self.scheduler.stats

    @stats.setter
    def stats(self, stats: SchedulerStats) -> None:
        self.scheduler.stats = stats

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def free(self) -> list[int]:
        return self.scheduler.free

    @property
    def admitted(self) -> list[Sequence]:
        return self.scheduler.admitted

    @property
    def paused(self) -> int:
        return self.scheduler.paused

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def can_step(self) -> bool:
        return self.scheduler.can_step

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)

    def pause(self, seq: Sequence) -> None:
        self.scheduler.pause(seq)

    def resume(self, seq: Sequence) -> None:
        self.scheduler.resume(seq)

    def step(self) -> list[StepOutput]:
        """Schedule, execute, update; returns what each touched sequence got."""
        self.outputs = []
        plan = self.scheduler.schedule()
        result = StepResult()
        try:
            self.runner.execute(plan, result)
        except BaseException:
            self.scheduler.forget_running()
            self.outputs = self.scheduler.update(plan, result)
            raise
        self.outputs = self.scheduler.update(plan, result)
        return self.outputs
