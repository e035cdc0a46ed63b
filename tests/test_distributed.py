"""Distributed training on CPU with gloo, 2 processes: DDP and FSDP2 compute the single-process loss
and gradients of the global batch; `torchrun -m andromeda train` follows the single-process loss
curve; checkpoints resume on another number of processes; a killed rank fails the job promptly.

Every test is bounded: workers use a 60 s process-group timeout (`--dist-timeout 60`) and the
parent waits with a deadline, so a hang fails the test instead of blocking the suite.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from andromeda import Andromeda, Config, cli
from andromeda.checkpoint import (
    OPTIMIZER_DIR,
    save_pretrained,
    latest_checkpoint,
    load_train_config,
    load_transformer,
    step_checkpoints,
)
from andromeda.parallel.dcp import load_optimizer, save_optimizer
from andromeda.parallel.environment import DistEnv, distributed
from andromeda.parallel.parallelize import apply_activation_checkpointing, check_parallel_setup
from andromeda.train import TrainConfig
from andromeda.train.optim import build_optimizer
from andromeda.train.state import read_trainer_state
from helpers import CORPUS_TEXT, child_env
from helpers import free_port as _free_port

WORLD_SIZE = 2
DEADLINE_S = 120
CONFIG = Config.from_preset("tiny", max_seq_len=64)
BATCH, SEQ, ACCUM = 8, 32, 2


def _global_batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, CONFIG.num_tokens, (BATCH, SEQ + 1), generator=generator)


def _make_net(device="cpu"):
    torch.manual_seed(0)
    return Andromeda.from_config(CONFIG, device=device).Andromeda


def _parallel_worker(rank: int, port: int, out: str, checkpoint: str) -> None:
    """Run each parallel setup on this rank's block of the global batch; rank 0 saves what it saw."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from torch.distributed.tensor import DTensor

    from andromeda.parallel.environment import all_reduce_mean, distributed
    from andromeda.parallel.parallelize import build_parallel_model, clip_grad_norm, gradient_sync

    results = {}
    with distributed(torch.device("cpu"), timeout_s=60) as env:
        per_rank = BATCH // env.world_size
        block = _global_batch()[rank * per_rank : (rank + 1) * per_rank]  # (B / W, T + 1)
        setups = {"ddp": dict(mode="ddp", init=_make_net),
                  "fsdp": dict(mode="fsdp", init=_make_net, activation_checkpointing=True),
                  "fsdp_from_checkpoint": dict(mode="fsdp", checkpoint=Path(checkpoint)),
                  "fsdp_bf16": dict(mode="fsdp", init=_make_net, param_dtype=torch.bfloat16)}
        for name, setup in setups.items():
            net, train_module = build_parallel_model(CONFIG, env=env, **setup)
            total = torch.zeros(())
            micro_batches = block.chunk(ACCUM)  # (B / W / A, T + 1) each
            for index, micro in enumerate(micro_batches):
                with gradient_sync(train_module, enabled=index == len(micro_batches) - 1):
                    # --bf16 under FSDP: autocast, as one process runs it, over bf16-gathered blocks
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "fsdp_bf16"):
                        loss = train_module(micro[:, :-1], targets=micro[:, 1:])
                    (loss / ACCUM).backward()
                total += loss.detach().float()
            params = list(net.parameters())
            norm = float(clip_grad_norm(params, max_norm=float("inf")))
            grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone()
                     for n, p in net.named_parameters()}
            results[name] = dict(loss=float(all_reduce_mean(total / ACCUM, env)), grads=grads, norm=norm,
                                 grad_dtypes={p.grad.dtype for p in params},
                                 sharded_after_backward=isinstance(net.to_logits.weight, DTensor))
    if rank == 0:
        torch.save(results, out)


@pytest.mark.parametrize("mode, batch, accum, world, message", [
    ("none", 8, 1, 2, "2 processes were launched but the parallel mode is 'none'; pass --parallel ddp"),
    ("ddp", 6, 2, 2, "batch size 6 does not split evenly over 2 processes x 2 accumulation micro-steps; "
                     "use a --batch-size that is a multiple of 4"),
    ("zero", 8, 1, 1, "unknown parallel mode 'zero'; expected one of none, ddp, fsdp"),
])
def test_parallel_setups_that_cannot_work_are_rejected(mode, batch, accum, world, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_parallel_setup(mode, batch, accum, DistEnv(rank=0, world_size=world))


def test_one_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed(torch.device("cpu")) as env:
        assert env == DistEnv() and env.is_main and not env.distributed
        assert not torch.distributed.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="WORLD_SIZE is set but RANK or LOCAL_RANK is not; launch with torchrun"):
        with distributed(torch.device("cpu")):
            pass


def test_activation_checkpointing_gives_identical_loss_and_gradients():
    torch.manual_seed(0)
    plain = Andromeda.from_config("tiny", max_seq_len=64)
    checkpointed = Andromeda.from_config("tiny", max_seq_len=64)
    checkpointed.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(checkpointed.Andromeda)
    tokens = torch.randint(0, 258, (2, 33))
    loss_a, loss_b = plain(tokens), checkpointed(tokens)
    loss_a.backward()
    loss_b.backward()
    assert torch.equal(loss_a, loss_b)
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.equal(a.grad, b.grad), name
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()



def test_optimizer_state_round_trips_by_parameter_name(tmp_path):
    """A model without QK-norm has no QK-scale group: every group must come back with its
    hyperparameters, and every moment bit for bit."""
    config = TrainConfig(out=str(tmp_path), max_steps=1, weight_decay=0.1)
    torch.manual_seed(0)
    model = Andromeda.from_config(CONFIG.replace(qk_norm=False, attn_qk_norm=False))
    optimizer = build_optimizer(model.Andromeda, config)
    model(_global_batch()).backward()
    optimizer.step()
    save_optimizer(tmp_path / "optimizer", model.Andromeda, optimizer)
    again = build_optimizer(model.Andromeda, config)
    load_optimizer(tmp_path / "optimizer", model.Andromeda, again)
    saved, loaded = optimizer.state_dict(), again.state_dict()
    assert loaded["param_groups"] == saved["param_groups"]
    assert saved["state"].keys() == loaded["state"].keys() and len(saved["state"]) == len(list(model.parameters()))
    for index, moments in saved["state"].items():
        assert all(torch.equal(moments[k], loaded["state"][index][k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def _spawn(worker, *args) -> None:
    context = mp.start_processes(worker, args=args, nprocs=WORLD_SIZE, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"distributed workers did not finish within {DEADLINE_S}s")


@pytest.fixture(scope="module")
def parallel_results(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parallel")
    out = folder / "results.pt"
    save_pretrained(_make_net(), folder / "checkpoint")
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned workers
    try:
        _spawn(_parallel_worker, _free_port(), str(out), str(folder / "checkpoint"))
    finally:  # the later tests of this worker process see its environment as it was
        if before is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = before
    return torch.load(out, weights_only=False)


def _single_process(bf16: bool = False):
    """One process, the whole global batch at once: the mean over all its target tokens."""
    net = _make_net()
    batch = _global_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = net(batch[:, :-1], targets=batch[:, 1:])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    return float(loss.detach()), grads


@pytest.fixture(scope="module")
def reference():
    return _single_process()


@pytest.mark.parametrize("name", ["ddp", "fsdp", "fsdp_from_checkpoint"])
def test_parallel_loss_and_gradients_equal_single_process(parallel_results, reference, name):
    result, (loss, grads) = parallel_results[name], reference
    assert result["loss"] == pytest.approx(loss, rel=1e-6)
    assert result["grads"].keys() == grads.keys()
    for param, grad in grads.items():
        torch.testing.assert_close(result["grads"][param], grad, rtol=1e-5, atol=1e-7, msg=param)
    expected_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
    assert result["norm"] == pytest.approx(float(expected_norm), rel=1e-5)


def test_fsdp_weights_are_shards_again_after_backward(parallel_results):
    # The loss is computed inside the Transformer's forward, so FSDP needs no special handling of
    # the output projection: after backward every weight is a shard again.
    assert parallel_results["fsdp"]["sharded_after_backward"]


def test_fsdp_bf16_computes_what_one_process_computes_under_autocast(parallel_results, reference):
    """--bf16 means one thing: under FSDP the blocks gather bf16 weights and the run is under
    autocast, norms and residual stream fp32, as on one process. What remains is the QK-norm
    scales' bf16 rounding and summation order: far below the bf16-vs-fp32 difference."""
    result = parallel_results["fsdp_bf16"]
    autocast_loss, autocast_grads = _single_process(bf16=True)
    fp32_loss = reference[0]
    assert result["grad_dtypes"] == {torch.float32}  # reduce_dtype, and the fp32 shards
    assert abs(result["loss"] - autocast_loss) < 0.1 * abs(autocast_loss - fp32_loss)
    assert result["loss"] == pytest.approx(autocast_loss, rel=2e-4)
    for name in ("to_logits.weight", "blocks.0.attn.to_qkv.weight", "blocks.1.ff.proj_in.weight"):
        cosine = torch.nn.functional.cosine_similarity(result["grads"][name].flatten(),
                                                       autocast_grads[name].flatten(), dim=0)
        assert cosine > 0.999, name


# --------------------------------------------------------------------------- torchrun, end to end

STEPS = 4


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    (root / "corpus.txt").write_text(CORPUS_TEXT)
    return root


def _train_args(workspace, out, *extra) -> list[str]:
    """A tiny run whose global batch (8 sequences) splits into 2 processes x 2 micro-steps."""
    corpus = str(workspace / "corpus.txt")
    return ["train", "--out", str(out), "--preset", "tiny", "--override", "max_seq_len=64", "--data", corpus,
            "--eval-data", corpus, "--batch-size", "8", "--grad-accum", "2", "--seq-len", "32",
            "--max-steps", str(STEPS), "--warmup-steps", "2", "--lr", "3e-3", "--save-every", "2",
            "--eval-every", "100", "--eval-batches", "1", "--log-every", "1", "--keep", "10", "--device", "cpu",
            "--no-progress", "--cache-dir", str(workspace / "cache"), "--dist-timeout", "60", *extra]


def _torchrun_command(args: list[str], nproc: int = WORLD_SIZE) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "andromeda", *args]


def _torchrun(args: list[str]) -> str:
    done = subprocess.run(_torchrun_command(args), env=child_env(), capture_output=True, text=True,
                          timeout=DEADLINE_S)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _single(args: list[str]) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(args) == 0
    finally:
        torch.set_num_threads(threads)


def _metrics(run: Path, kind: str) -> list[tuple[int, float]]:
    entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e["loss"]) for e in entries if e["type"] == kind]


def _assert_same_curve(run: Path, reference: Path, kind: str = "train", after: int = 0) -> None:
    got = [(s, loss) for s, loss in _metrics(run, kind) if s > after]
    expected = [(s, loss) for s, loss in _metrics(reference, kind) if s > after]
    assert expected and [s for s, _ in got] == [s for s, _ in expected]
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], rel=1e-5)


def _assert_same_weights(run: Path, reference: Path) -> None:
    got, expected = load_transformer(run).state_dict(), load_transformer(reference).state_dict()
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def _fork(run: Path, step: int, new: Path) -> Path:
    """A copy of `run` as it was when the checkpoint of `step` had just been written."""
    name = f"step_{step:06d}"
    shutil.copytree(run / "checkpoints" / name, new / "checkpoints" / name)
    (new / "latest").write_text(f"checkpoints/{name}\n")
    shutil.copy(run / "metrics.jsonl", new / "metrics.jsonl")  # resume drops the lines past `step`
    return new


@pytest.fixture(scope="module")
def runs(workspace):
    """The same run in one process, and over 2 processes with DDP and with FSDP."""
    _single(_train_args(workspace, workspace / "single"))
    stdout = _torchrun(_train_args(workspace, workspace / "ddp", "--parallel", "ddp"))
    assert stdout.count(f"trained {STEPS} steps") == 1  # rank 0 alone prints the summary
    _torchrun(_train_args(workspace, workspace / "fsdp", "--parallel", "fsdp"))
    return workspace


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_follow_the_single_process_loss_curve(runs, mode):
    _assert_same_curve(runs / mode, runs / "single")
    _assert_same_curve(runs / mode, runs / "single", kind="eval")
    _assert_same_weights(runs / mode, runs / "single")


def test_a_two_process_checkpoint_resumes_in_two_processes_and_in_one(runs):
    two = _fork(runs / "fsdp", 2, runs / "fsdp_resumed_in_2")
    _torchrun(["train", "--out", str(two), "--resume", "--parallel", "ddp"])  # the mode may change too
    one = _fork(runs / "fsdp", 2, runs / "fsdp_resumed_in_1")
    _single(["train", "--out", str(one), "--resume", "--no-progress"])
    for resumed in (two, one):
        _assert_same_curve(resumed, runs / "single", after=2)
        _assert_same_weights(resumed, runs / "single")


def test_a_single_process_checkpoint_resumes_in_two_processes(runs):
    two = _fork(runs / "single", 2, runs / "single_resumed_in_2")
    _torchrun(["train", "--out", str(two), "--resume", "--parallel", "fsdp"])
    _assert_same_curve(two, runs / "single", after=2)
    _assert_same_weights(two, runs / "single")


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process exited while we looked
            continue
        if int(fields[1]) == pid:  # the field after the state is the parent pid
            found.append(int(stat.parent.name))
    return sorted(found)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds the worker processes through /proc")
def test_killing_one_rank_fails_the_job_and_keeps_the_last_checkpoint_loadable(workspace):
    run = workspace / "killed"
    args = _train_args(workspace, run, "--parallel", "fsdp", "--max-steps", "100000", "--eval-batches", "0")
    launcher = subprocess.Popen(_torchrun_command(args), env=child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while latest_checkpoint(run) is None:
            assert launcher.poll() is None, launcher.communicate()[0]
            assert time.monotonic() < deadline, "no checkpoint was written in time"
            time.sleep(0.2)
        workers = _children(launcher.pid)
        assert len(workers) == WORLD_SIZE
        killed_at = time.monotonic()
        os.kill(workers[-1], signal.SIGKILL)
        output, _ = launcher.communicate(timeout=60)
        took = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert launcher.returncode != 0
    assert took < 60
    assert "SIGKILL" in output and "andromeda FAILED" in output  # torchrun names the rank that died

    checkpoint = latest_checkpoint(run)
    step = int(checkpoint.name.removeprefix("step_"))
    assert step >= 2 and step % 2 == 0
    for folder in step_checkpoints(run):  # a write the kill cut short is never a step_* folder
        assert {"model.safetensors", "trainer_state.safetensors", "optimizer"} <= {p.name for p in folder.iterdir()}
    net = load_transformer(run)
    optimizer = build_optimizer(net, TrainConfig.from_dict(load_train_config(checkpoint)))
    load_optimizer(checkpoint / OPTIMIZER_DIR, net, optimizer)
    assert {int(s["step"]) for s in optimizer.state.values()} == {step}
    assert read_trainer_state(checkpoint).progress.step == step


def test_slow_data_preparation_does_not_trip_the_collective_timeout(workspace):
    """Rank 0 stalls 8 s while preparing the data (what tokenising a large corpus does); the
    collectives' timeout is 3 s. The other process waits on the wait group, which has no
    practical limit, and the run trains."""
    out = workspace / "slow_data"
    args = _train_args(workspace, out, "--parallel", "ddp", "--max-steps", "2", "--dist-timeout", "3",
                       "--eval-batches", "0")
    done = subprocess.run(_torchrun_command(args), env=child_env(ANDROMEDA_TEST_PAUSE_AT="rank0:prepare-data@8"),
                          capture_output=True, text=True, timeout=DEADLINE_S)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "paused at prepare-data" in done.stderr
    assert latest_checkpoint(out).name == "step_000002"


BIG = Config.from_preset("tiny", dim=512, dim_head=64, heads=8, depth=8, num_tokens=4096, max_seq_len=64)  # 26 M


class PeakAnonymousMemory:
    """Samples this process's anonymous resident memory (RssAnon: tensors, not the page cache of
    files it maps) every millisecond in a thread; `peak` is the highest seen."""

    def __init__(self) -> None:
        self.peak, self.running = 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def now() -> int:
        line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("RssAnon:"))
        return int(line.split()[1]) * 1024

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.now())
            time.sleep(0.001)

    def __enter__(self) -> "PeakAnonymousMemory":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.now())


def _peak_worker(rank: int, port: int, checkpoint: str, out: str) -> None:
    """Load a checkpoint into an FSDP model; report this process's peak memory growth."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from andromeda.parallel.parallelize import build_parallel_model

    import importlib

    from andromeda.weights import SafetensorsFile

    parallelize_module = importlib.import_module("andromeda.parallel.parallelize")

    read = []  # elements of every tensor or rows this process reads from the checkpoint

    class CountingReader(SafetensorsFile):
        """The safetensors reader, counting what is read through it."""

        def read(self, name, out=None):
            tensor = super().read(name, out)
            read.append(tensor.numel())
            return tensor

        def read_rows(self, name, start, stop):
            rows = super().read_rows(name, start, stop)
            read.append(rows.numel())
            return rows

    parallelize_module.SafetensorsFile = CountingReader
    with distributed(torch.device("cpu"), timeout_s=60) as env:
        small = BIG.replace(depth=1)  # a first, small model warms up FSDP's code paths
        build_parallel_model(small, "fsdp", env, init=lambda device: Andromeda.from_config(small, device=device).Andromeda)
        before = PeakAnonymousMemory.now()
        with PeakAnonymousMemory() as memory:
            net, _ = build_parallel_model(BIG, "fsdp", env, checkpoint=Path(checkpoint))
        local = sum(p.to_local().numel() * 4 for p in net.parameters())
    report = {"grown": memory.peak - before, "local": local, "read": 4 * sum(read)}
    Path(f"{out}.{rank}").write_text(json.dumps(report))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="measures memory through /proc")
def test_fsdp_loads_a_checkpoint_without_any_process_holding_the_whole_model(tmp_path):
    torch.manual_seed(0)
    net = Andromeda.from_config(BIG).Andromeda
    whole = sum(p.numel() * 4 for p in net.parameters())  # ~105 MB in fp32
    save_pretrained(net, tmp_path / "checkpoint")
    del net
    _spawn(_peak_worker, _free_port(), str(tmp_path / "checkpoint"), str(tmp_path / "peak"))
    for rank in range(WORLD_SIZE):
        report = json.loads((tmp_path / f"peak.{rank}").read_text())
        assert report["local"] == pytest.approx(whole / WORLD_SIZE, rel=0.02)  # its shards
        assert report["read"] == pytest.approx(whole / WORLD_SIZE, rel=0.02)  # read from the file: just those
        assert report["grown"] < 0.75 * whole, f"rank {rank} grew {report['grown'] / 1e6:.0f} MB"
