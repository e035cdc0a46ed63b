"""Tokenizer worker processes: start them, hand out tasks, collect results, stop them.

Each worker is ``python -c <bootstrap> <this folder>``: a fresh interpreter that loads this
folder as a private package (``_andromeda_data``) and runs :func:`worker.serve`, importing only
numpy, tokenizers and the readers — not torch, not the caller's ``__main__`` (so no
``if __name__ == "__main__"`` guard is needed, whatever the multiprocessing start method). Its
environment turns the tokenizers library's own thread pool off (``TOKENIZERS_PARALLELISM``), so
``num_proc`` workers use ``num_proc`` cores.

Tasks go out one at a time as JSON lines, to whichever worker is idle; results come back keyed
by task id, so the output does not depend on which worker did what. A task that fails stops the
pool and raises the worker's exception type with its message; a worker that dies (killed, out
of memory) raises ``RuntimeError`` with its exit code and the end of its stderr. A worker whose
parent dies exits at its next progress report.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

_BOOTSTRAP = (
    "import importlib, sys, types\n"
    "package = types.ModuleType('_andromeda_data')\n"
    "package.__path__ = [sys.argv[1]]\n"
    "sys.modules['_andromeda_data'] = package\n"
    "importlib.import_module('_andromeda_data.worker').serve()\n"
)
_WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
_ERRORS: dict[str, type[Exception]] = {
    "ValueError": ValueError, "ImportError": ImportError, "ModuleNotFoundError": ImportError,
    "FileNotFoundError": FileNotFoundError, "PermissionError": PermissionError, "OSError": OSError,
}


class _Worker:
    def __init__(self, settings: dict) -> None:
        self.stderr: IO[bytes] = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP, str(Path(__file__).parent)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
            env={**os.environ, **_WORKER_ENV},
        )
        self.buffer = b""
        self.task: dict | None = None
        self.send(settings)

    def send(self, message: dict) -> None:
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps(message).encode() + b"\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise self.died() from None

    def died(self) -> RuntimeError:
        code = self.process.wait()
        doing = f"while tokenizing {_describe(self.task)}" if self.task else "at start"
        return RuntimeError(
            f"a tokenizer worker (pid {self.process.pid}) exited with code {code} {doing}; "
            f"its stderr ends with:\n{self.stderr_tail()}"
        )

    def assign(self, task: dict) -> None:
        self.task = task
        self.send(task)

    def messages(self) -> list[dict] | None:
        """The complete replies available now; None once the worker has closed its stdout."""
        assert self.process.stdout is not None
        data = os.read(self.process.stdout.fileno(), 1 << 16)
        if not data:
            return None
        lines = (self.buffer + data).split(b"\n")
        self.buffer = lines.pop()
        return [json.loads(line) for line in lines]

    def stderr_tail(self, limit: int = 4000) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-limit:]

    def stop(self, kill: bool) -> None:
        if kill:
            self.process.kill()
        else:
            assert self.process.stdin is not None
            self.process.stdin.close()  # the worker exits at the end of its input
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None and not stream.closed:
                stream.close()
        output = self.stderr_tail()
        if output.strip() and not kill:
            logger.debug("tokenizer worker %d said:\n%s", self.process.pid, output)
        self.stderr.close()


def _describe(task: dict) -> str:
    where = task["path"]
    if "start" in task and "end" in task:
        where += f" bytes {task['start']}-{task['end']}"
    elif "row_groups" in task:
        where += f" row groups {task['row_groups'][0]}-{task['row_groups'][-1]}"
    return where


def run_in_workers(
    tasks: list[dict],
    settings: dict,
    num_workers: int,
    on_done: Callable[[dict, dict], None],
    on_progress: Callable[[float], None],
) -> None:
    """Run ``tasks`` (dicts with a unique ``id``) in ``num_workers`` worker processes.

    ``settings`` is the worker's first message (tokenizer folder, dtype, eos, vocab size, ...).
    ``on_done(task, counts)`` is called in this process as each task finishes, in completion
    order; ``on_progress(delta)`` with input weight done.
    """
    pending = deque(tasks)
    settings = {**settings, "parent": os.getpid()}
    workers: list[_Worker] = []
    failed = True
    selector = selectors.DefaultSelector()
    try:
        for _ in range(min(num_workers, len(tasks))):
            worker = _Worker(settings)
            workers.append(worker)
            assert worker.process.stdout is not None
            selector.register(worker.process.stdout, selectors.EVENT_READ, worker)
            worker.assign(pending.popleft())
        busy = len(workers)
        while busy:
            for key, _ in selector.select():
                worker = key.data
                messages = worker.messages()
                if messages is None:
                    raise worker.died()
                for message in messages:
                    if "error" in message:
                        logger.debug("tokenizer worker traceback:\n%s", message.get("traceback"))
                        error_type = _ERRORS.get(message["type"])
                        if error_type is None:
                            raise RuntimeError(f"{message['type']}: {message['error']}")
                        raise error_type(message["error"])
                    if "progress" in message:
                        on_progress(message["progress"])
                    if "done" in message:
                        task, worker.task = worker.task, None
                        on_done(task, message["done"])
                        if pending:
                            worker.assign(pending.popleft())
                        else:
                            busy -= 1
        failed = False
    finally:
        selector.close()
        for worker in workers:
            worker.stop(kill=failed)
