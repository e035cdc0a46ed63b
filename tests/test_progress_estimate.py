"""The time-budget progress bar estimates the run's length from the whole session's rate, so
periodic evaluations do not make its total jump (a clock advanced by the test: every step takes
1 s, every evaluation 30 s)."""

from __future__ import annotations

from andromeda.train import loop
from helpers import tiny_train_config


def test_the_time_budget_estimate_follows_the_sessions_rate(tmp_path, corpus, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(loop.time, "monotonic", lambda: clock[0])
    step, evaluate, log = loop.Trainer.step, loop.Trainer.evaluate, loop.Trainer.log
    estimates: list[tuple[int, int]] = []

    def timed_step(self):
        clock[0] += 1.0
        return step(self)

    def timed_evaluate(self):
        clock[0] += 30.0
        return evaluate(self)

    def recording_log(self, lr, bar):
        log(self, lr, bar)
        estimates.append((self.progress.step, bar.total))

    monkeypatch.setattr(loop.Trainer, "step", timed_step)
    monkeypatch.setattr(loop.Trainer, "evaluate", timed_evaluate)
    monkeypatch.setattr(loop.Trainer, "log", recording_log)
    config = tiny_train_config(tmp_path, corpus, max_steps=None, time_budget=100.0, eval_every=10, save_every=1000,
                               log_every=1, progress=True)
    result = loop.train(config)
    # Ten steps take 10 s, then an evaluation 30 s, ...: the budget runs out after about 30 steps.
    assert 28 <= result.step <= 32
    after_first_eval = [total for at, total in estimates if at > 10]
    assert after_first_eval and all(abs(total - result.step) <= 0.45 * result.step for total in after_first_eval), estimates
