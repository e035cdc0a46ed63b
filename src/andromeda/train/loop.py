"""The training run: set-up (resume or start, data, tokenizer, model spread over the processes,
optimizer) and the loop (step, log, evaluate, save, stop).

The data of step `s` is `sample_batch(tokens, s, batch_size, seq_len, seed, rank, world_size)`: a
function of the seed and the step alone, so a resumed run sees exactly the batches the
uninterrupted run would have, and the loss curve does not depend on the number of processes.

Under torchrun every process runs `train`; they agree on the clock and on interrupts once per step
(`all_reduce_max`), so they stop, evaluate and save at the same steps. Rank 0 alone logs metrics and
draws the progress bar. A checkpoint written by N processes resumes on any number of processes.

Determinism: on CPU, a run interrupted at any step (Ctrl-C, `kill -9`) and resumed with
`resume=True` ends bit-for-bit where the uninterrupted run ends — the checkpoint holds the
weights, the AdamW moments, the step, the RNG states and the logging accumulators, and nothing
else carries state between steps.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..checkpoint import (
    OPTIMIZER_DIR,
    ModelSource,
    latest_checkpoint,
    load_checkpoint_tokenizer,
    open_model_source,
    refuse_quantized,
    remove_incomplete,
    step_checkpoints,
    verify_model_files,
)
from ..config import Config
from ..data import iter_texts
from ..model import Transformer, build_transformer
from ..parallel.dcp import load_optimizer
from ..parallel.environment import (
    DistEnv,
    all_reduce_max,
    barrier,
    broadcast_object,
    distributed,
    node_first,
    resolve_device,
)
from ..parallel.parallelize import (
    TRAIN_COMPILE_SCOPE,
    apply_activation_checkpointing,
    build_parallel_model,
    check_parallel_setup,
)
from ..tokenizers import Tokenizer, build_tokenizer
from .chat import run_chat_template
from .config import TrainConfig, model_config
from .data import CompletionData, TextData, absolute_specs, check_same_data, data_files, data_identity, run_data
from .lock import run_lock
from .attention_kernel import use_attention_kernel
from .loss_kernel import use_loss_kernel
from .norm_kernel import use_norm_kernel
from .transpose_kernel import use_transpose_kernel
from .lora import is_qlora, lora_model, resumed_base
from .metrics import LOSS_PLOT_FILE, METRICS_FILE, MetricsLog, Trackers, plot_losses
from .optim import build_optimizer, decay_progress, lr_at
from .state import Progress, TrainerState, restore_training, save_training_checkpoint, set_rng_state
from .step import NonFiniteLossError, train_step

logger = logging.getLogger(__name__)

BPE_PIECE_CHARS = 1 << 20  # a BPE is trained on documents in pieces of this size: none held whole
# A test hook a caller may pass (the command line does: andromeda/pause.py), called as
# pause(name) at each named point of the run, or pause(name, until) where it may wait for a
# stop signal to be handled. The points: "prepare-data", "after-step:N", "before-rename:step_N".
PausePoint = Callable[..., None]


@dataclass
class TrainResult:
    step: int
    train_loss: float | None  # mean over the last logged interval
    eval: dict[str, float | int] | None  # the final held-out evaluation
    checkpoint: Path
    elapsed_s: float
    stopped_by: str  # "max_steps" or "time_budget"
    run_dir: Path


def train(config: TrainConfig, *, pause: PausePoint | None = None, tokenizer_pause: str | None = None,
          after_step: Callable[[], None] | None = None) -> TrainResult:
    """Run (or, with `config.resume`, continue) the training run `config` describes.

    Stops at `max_steps` or when `time_budget` seconds of training loop have passed (counting
    earlier runs of a resumed run), whichever is first; then evaluates, saves a final checkpoint and
    plots `loss.png`. A first Ctrl-C saves a checkpoint and re-raises KeyboardInterrupt; SIGTERM or
    SIGUSR1 save one after the current step and raise Preempted, or before the first step (while the
    data is tokenised) raise it at once. A non-finite loss raises NonFiniteLossError, keeping the last
    good checkpoint.

    Under torchrun every process calls it (`config.parallel` says how they share the work) and all
    of them return the same result. `pause` and `tokenizer_pause` are test hooks (PausePoint, and
    `data.tokenize_corpus`'s); without them nothing pauses. `after_step()`, where given, runs after
    every step and what follows it (logging, evaluation, a save): the process owner's hook
    (`andromeda train` on the CPU bounds its kept heap there: `heap.FreedMemory`).
    """
    if not config.resume:  # the run's files, wherever it is resumed from
        config = config.replace(data=absolute_specs(config.data), eval_data=absolute_specs(config.eval_data),
                                chat_template=config.chat_template and absolute_specs((config.chat_template,))[0])
    device = resolve_device(config.device)
    if config.bf16 is None:  # bf16 where it pays: tensor cores; on CPU fp32 unless asked
        config = config.replace(bf16=device.type == "cuda")
    with distributed(device, config.dist_timeout) as env:
        # Rank 0 holds the run folder for the whole run; a second run on it stops here.
        with run_lock(Path(config.out)) if env.is_main else contextlib.nullcontext():
            with preempted_before_training():
                trainer = Trainer(config, env, pause=pause, tokenizer_pause=tokenizer_pause, after_step=after_step)
            context = logging_redirect_tqdm() if trainer.show_progress else contextlib.nullcontext()
            with context:
                return trainer.run()


class Trainer:
    """One training run on this process: everything it needs, built in `__init__`, and the loop.

    All processes run the same loop and must make the same decisions at the same steps, so the
    clock and the stop requests are agreed on once per step (`sync`): the maximum over processes.
    """

    def __init__(self, config: TrainConfig, env: DistEnv, *, pause: PausePoint | None = None,
                 tokenizer_pause: str | None = None, after_step: Callable[[], None] | None = None) -> None:
        check_parallel_setup(config.parallel, config.batch_size, config.grad_accum, env)
        if config.lora_rank is not None and config.parallel == "fsdp" and env.distributed:
            raise ValueError("a LoRA run (--lora-rank) shares its work with --parallel ddp, not fsdp: its trainable "
                             "adapters are small, and every process holds the frozen base")
        self.config, self.env = config, env
        self.lora_base: ModelSource | None = None  # a LoRA run's frozen base
        self.pause, self.tokenizer_pause = pause, tokenizer_pause  # test hooks (see `train`)
        self.after_step = after_step
        self.run_dir = Path(config.out)
        self.metrics = MetricsLog(self.run_dir / METRICS_FILE)
        # --init-from's folder (a checkpoint, run folder or Hugging Face export), opened once. A
        # resumed fine-tune continues from its own checkpoint: its base is only recorded
        # (train_config.json's init_from), not read again, and may have moved since. (A LoRA run's
        # checkpoints hold only adapters: it reads its base again, `_build_lora_model`.)
        self.init_source = open_model_source(config.init_from) if config.init_from and not config.resume else None
        if self.init_source is not None and config.lora_rank is None:  # QLoRA trains adapters over one
            refuse_quantized(self.init_source, "--init-from (training every weight; --lora-rank trains adapters "
                                               "over it)")
        resume_from, tokenizer, state = self._resume_or_start()
        # The template the checkpoints keep (and chat data is rendered with): text, read once.
        self.chat_template = run_chat_template(config, self.init_source, resume_from)
        model_cfg = resume_from.config if resume_from is not None else None
        barrier(env)  # every process has read the run folder before rank 0 cleans it
        if env.is_main:
            remove_incomplete(self.run_dir)
        self.tokenizer, self.data, self.data_identity = self._prepare_data(resume_from, tokenizer)
        if model_cfg is None:
            base = self.init_source.config if self.init_source is not None else None
            model_cfg = model_config(config, self.tokenizer, base)
        self.model_cfg = model_cfg
        self.net, self.train_module, self.autocast = self._build_model(resume_from, model_cfg)
        if env.device.type == "cpu" and self.autocast:  # bf16 on the CPU: the loss's softmax, attention, norms
            use_loss_kernel(self.net)                       # and the weight gradients' transposes by kernels
            use_attention_kernel(self.net)
            use_norm_kernel(self.net)
            use_transpose_kernel(self.net)
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.net, config)
        self.fresh = state is None
        self.progress = self._restore(resume_from, state)
        # The learning-rate schedule keeps the length the run started with: steps past it (a run
        # extended with a larger --max-steps or --time-budget) train at min_lr.
        self.schedule = config.replace(max_steps=self.progress.schedule_steps, time_budget=self.progress.schedule_s)
        self._log_setup(model_cfg)
        self.trackers = Trackers(config.report_to, self.run_dir, config.to_dict(), run_id=self._run_id()) \
            if env.is_main else None
        self.show_progress = config.progress and env.is_main
        self.last_eval: dict[str, float | int] | None = None
        self.last_train_loss: float | None = None
        self.grad_norm = float("nan")
        self.saved_step: int | None = None
        self.now = self.progress.elapsed_s  # seconds of training loop, as agreed at the last sync
        self.start = time.monotonic() - self.progress.elapsed_s
        self.stop: str | None = None  # the agreed reason to stop early: "interrupt" or "preempt"
        self.log_start, self.log_steps = time.monotonic(), 0

    def _resume_or_start(self) -> tuple[ModelSource | None, Tokenizer | None, TrainerState | None]:
        """With --resume, the checkpoint to continue (opened), its tokenizer and trainer state;
        else check the run folder is free and return nothing."""
        if self.config.resume:
            checkpoint = latest_checkpoint(self.run_dir)
            if checkpoint is None:
                raise FileNotFoundError(f"nothing to resume: {self.run_dir} has no checkpoint in "
                                        f"{self.run_dir / 'checkpoints'}; start without --resume")
            return restore_training(checkpoint, self.config)
        existing = step_checkpoints(self.run_dir)
        if existing:
            raise FileExistsError(f"{self.run_dir} already holds a run ({existing[-1].name}); pass --resume to "
                                  f"continue it, or choose another --out")
        return None, None, None

    def _prepare_data(self, resume_from: ModelSource | None, tokenizer: Tokenizer | None
                      ) -> tuple[Tokenizer, TextData | CompletionData, dict | None]:
        """The tokenizer (the run's, --init-from's, or built now), the tokenised data, and the
        identity of the data files (checked against the run's on resume)."""
        config, env = self.config, self.env
        with node_first(env):  # one process per node fetches the corpus; the others find it there
            train_files, eval_files = data_files(config)
        identity = data_identity(train_files, eval_files) if env.is_main else None
        if resume_from is not None and env.is_main:
            check_same_data(resume_from.folder, identity, config.allow_data_change)
        if tokenizer is None and self.init_source is not None:
            tokenizer = load_checkpoint_tokenizer(self.init_source)
        if tokenizer is None:
            # Rank 0 alone builds the tokenizer (a BPE is trained once) and hands it to the others.
            texts = lambda: iter_texts(train_files, config.text_field, max_chars=BPE_PIECE_CHARS)  # noqa: E731
            tokenizer = build_tokenizer(config.tokenizer, train_texts=texts,
                                        vocab_size=config.bpe_vocab_size) if env.is_main else None
            tokenizer = broadcast_object(tokenizer, env)
        with node_first(env):  # one process per node tokenises into the cache; the others read it
            if self.pause is not None:
                self.pause("prepare-data")
            data = run_data(config, tokenizer, train_files, eval_files,
                            progress=config.progress and env.local_rank == 0, tokenizer_pause=self.tokenizer_pause,
                            chat_template=self.chat_template)
        return tokenizer, data, identity

    def _build_model(self, resume_from: ModelSource | None, model_cfg: Config) -> tuple[Transformer, nn.Module, bool]:
        """The model spread over the processes, the module to call for the loss, and whether to
        run under bf16 autocast (also under FSDP, whose blocks then gather their weights in bf16)."""
        config, env = self.config, self.env
        if config.lora_rank is not None:
            return self._build_lora_model(resume_from, model_cfg)
        sharded = config.parallel == "fsdp" and env.distributed
        source = resume_from  # verified whole against its manifest by restore_training
        if source is None and self.init_source is not None:
            source = self.init_source
            verify_model_files(source)
        net, train_module = build_parallel_model(
            model_cfg, config.parallel, env, checkpoint=source,
            init=None if source is not None else self._initialise,
            param_dtype=torch.bfloat16 if config.bf16 and sharded else None,
            activation_checkpointing=config.activation_checkpointing, compile=self._compile_scope())
        net.train()
        return net, train_module, config.bf16

    def _build_lora_model(self, resume_from: ModelSource | None, model_cfg: Config
                          ) -> tuple[Transformer, nn.Module, bool]:
        """The frozen base with its LoRA adapters (fresh, or the resumed run's), on every process.
        A resumed run reads its base again from where the checkpoint records it, checked by hash."""
        config, env = self.config, self.env
        self.lora_base = self.init_source if resume_from is None else resumed_base(resume_from)
        verify_model_files(self.lora_base)
        init = functools.partial(lora_model, self.lora_base, model_cfg, config, resume_from=resume_from)
        if is_qlora(self.lora_base, config):
            # Quantized layers have no parallel or compiled form: one process, eager.
            if env.distributed or config.compile:
                raise ValueError("QLoRA (a quantized base) trains in one process without --compile; drop "
                                 "--quantize (or give a full-precision --init-from) to use them")
            net = init(env.device)
            if config.activation_checkpointing:
                apply_activation_checkpointing(net)
            return net, net, config.bf16
        net, train_module = build_parallel_model(model_cfg, config.parallel, env, init=init,
                                                 activation_checkpointing=config.activation_checkpointing,
                                                 compile=self._compile_scope())
        net.train()
        return net, train_module, config.bf16

    def _compile_scope(self) -> str | None:
        """What --compile compiles (`TRAIN_COMPILE_SCOPE`), or None without it."""
        return TRAIN_COMPILE_SCOPE if self.config.compile else None

    def _initialise(self, device: torch.device) -> Transformer:
        """A fresh model in fp32 (master weights), seeded by the run's seed."""
        torch.manual_seed(self.config.seed)
        return build_transformer(self.model_cfg, device=device)

    def _restore(self, resume_from: ModelSource | None, state: TrainerState | None) -> Progress:
        """The optimizer state, RNGs and progress of a resumed run; a fresh run's progress."""
        config, env = self.config, self.env
        if state is not None:
            load_optimizer(resume_from.folder / OPTIMIZER_DIR, self.net, self.optimizer)
            set_rng_state(state.rng, env.device)
            if env.is_main:
                self.metrics.truncate_after(state.progress.step)
            logger.info("resuming %s at step %d", self.run_dir, state.progress.step)
            return state.progress
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.metrics.path.write_text("")
        return Progress(schedule_steps=config.max_steps, schedule_s=config.time_budget)

    def _run_id(self) -> str:
        """A stable id for the run (its trackers resume the same run): from the folder's path."""
        return hashlib.sha256(str(self.run_dir.resolve()).encode()).hexdigest()[:16]

    def _log_setup(self, c: Config) -> None:
        config, env = self.config, self.env
        logger.info("model: %s parameters (dim %d, depth %d, %d heads of %d, %d kv heads, %d ALiBi heads, vocab %d)",
                    f"{self.net.num_parameters():,}", c.dim, c.depth, c.heads, c.dim_head, c.attn_kv_heads,
                    c.num_alibi_heads, c.num_tokens)
        if self.lora_base is not None:
            trained = sum(p.numel() for p in self.params)
            base = build_transformer(c, device="meta").num_parameters()  # quantized weights are buffers
            logger.info("LoRA rank %d on %s over %s%s: %s trainable parameters (%.2f%% of the base's %s)",
                        config.lora_rank, ", ".join(config.lora_targets), self.lora_base.folder,
                        f" ({config.quantize or self.lora_base.describe()})" if is_qlora(self.lora_base, config) else "",
                        f"{trained:,}", 100 * trained / base, f"{base:,}")
        if env.distributed:
            logger.info("%s over %d processes: %d sequences per process per step, in %d micro-steps",
                        config.parallel, env.world_size, config.batch_size // env.world_size, config.grad_accum)
        if config.compile:
            logger.info("--compile: torch.compile of each block; the first step (and the first evaluation) compile "
                        "for tens of seconds")
        if config.max_steps is not None and config.warmup_steps >= config.max_steps:
            logger.warning("warmup_steps (%d) >= max_steps (%d): the learning rate never decays",
                           config.warmup_steps, config.max_steps)

    # ----------------------------------------------------------------------- the loop

    def run(self) -> TrainResult:
        config, progress = self.config, self.progress
        if not self.fresh and self.done():
            return self._already_finished()
        if self.fresh:
            with preempted_before_training():
                self.evaluate()
        # The time budget covers everything from here, earlier runs of a resumed run included.
        self.start = time.monotonic() - progress.elapsed_s
        self.log_start, self.log_steps = time.monotonic(), 0
        # The time budget's step estimate uses the rate over this whole session, not the last
        # logging interval, which an evaluation or a save in it would make jump.
        self.loop_start_step, self.loop_start_s = progress.step, self.now
        bar = tqdm(total=config.max_steps, initial=progress.step, unit="step", disable=not self.show_progress,
                   dynamic_ncols=True)
        try:
            with stop_signals() as requests:
                self.sync(requests)
                while not self.done():
                    lr = self.step()
                    if self.pause is not None:
                        self.pause(f"after-step:{progress.step}", lambda: requests.interrupt or requests.preempt)
                    self.sync(requests)
                    bar.update(1)
                    if progress.step % config.log_every == 0:
                        self.log(lr, bar)
                    finished = self.done()
                    if progress.step % config.eval_every == 0 and not finished:
                        self.evaluate()
                    if progress.step % config.save_every == 0 and not finished:
                        self.save()
                    if self.after_step is not None:
                        self.after_step()
                    if self.stop is not None:
                        self._stop_early()
        except BaseException:
            if self.trackers is not None:
                self.trackers.close()
            raise
        finally:
            if config.max_steps is None:  # the estimated total becomes the steps actually taken
                bar.total = bar.n
                bar.refresh()
            bar.close()
        stopped_by = "max_steps" if config.max_steps is not None and progress.step >= config.max_steps else "time_budget"
        final_eval = self.evaluate()
        checkpoint = self.save()
        if self.env.is_main:
            plot_losses(self.metrics.read(), self.run_dir / LOSS_PLOT_FILE)
            self.trackers.finish(self.run_dir / LOSS_PLOT_FILE)
        # The command prints the summary; a library caller gets it in the result.
        logger.debug("finished at step %d after %.0fs (%s); checkpoint %s", progress.step, self.now,
                    stopped_by, checkpoint)
        return TrainResult(step=progress.step, train_loss=self.last_train_loss, eval=final_eval,
                           checkpoint=checkpoint, elapsed_s=self.now, stopped_by=stopped_by,
                           run_dir=self.run_dir)

    def _stop_early(self) -> None:
        """Every process agreed to stop after this step: save (unless just saved) and leave."""
        step = self.progress.step
        if self.saved_step != step:
            self.save()
        where = f"at step {step}; saved a checkpoint in {self.run_dir} (continue with --resume)"
        if self.stop == "preempt":
            raise Preempted(f"preempted (SIGTERM/SIGUSR1) {where}")
        raise KeyboardInterrupt(f"interrupted {where}")

    def _already_finished(self) -> TrainResult:
        """A resumed run that had already reached its stop: nothing to train, evaluate or save."""
        checkpoint = latest_checkpoint(self.run_dir)
        logger.info("%s already finished at step %d; give a larger --max-steps or --time-budget to train "
                    "longer", self.run_dir, self.progress.step)
        evals = [e for e in self.metrics.read() if e.get("type") == "eval"]
        last_eval = {k: v for k, v in evals[-1].items() if k not in ("type", "step")} if evals else None
        stopped_by = ("max_steps" if self.config.max_steps is not None and self.progress.step >= self.config.max_steps
                      else "time_budget")
        return TrainResult(step=self.progress.step, train_loss=None, eval=last_eval, checkpoint=checkpoint,
                           elapsed_s=self.progress.elapsed_s, stopped_by=stopped_by, run_dir=self.run_dir)

    def sync(self, requests: StopRequests) -> None:
        """Agree on the elapsed time and on whether any process was asked to stop, so every process
        stops after the same step."""
        self.now, interrupt, preempt = all_reduce_max(
            [time.monotonic() - self.start, float(requests.interrupt), float(requests.preempt)], self.env)
        self.stop = "preempt" if preempt else "interrupt" if interrupt else None

    def done(self) -> bool:
        config, progress = self.config, self.progress
        if config.max_steps is not None and progress.step >= config.max_steps:
            return True
        return config.time_budget is not None and self.now >= config.time_budget

    def step(self) -> float:
        """One update; returns its learning rate."""
        progress, config, env = self.progress, self.config, self.env
        batch = self.data.batch(progress.step, env)
        if progress.step == config.warmup_steps and progress.warmup_end_s is None:
            progress.warmup_end_s = self.now
        decay = decay_progress(progress.step, self.schedule, self.now, progress.warmup_end_s)
        lr = lr_at(progress.step, self.schedule, decay)
        try:
            loss, self.grad_norm = train_step(self.train_module, self.params, batch, self.optimizer, lr, config,
                                              progress.step, env, self.autocast)
        except NonFiniteLossError as err:
            last = latest_checkpoint(self.run_dir)
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was saved yet"
            raise NonFiniteLossError(f"{err}: training stopped; {kept}. Try a lower --lr, a smaller "
                                     f"--grad-clip, or training without --bf16") from None
        progress.step += 1
        progress.loss_sum += loss
        progress.loss_count += 1
        self.log_steps += 1
        return lr

    def log(self, lr: float, bar: tqdm) -> None:
        progress, config = self.progress, self.config
        now = time.monotonic()
        self.last_train_loss = progress.loss_sum / progress.loss_count
        step_s = (now - self.log_start) / max(self.log_steps, 1)
        rate = config.batch_size * config.seq_len / max(step_s, 1e-9)
        if self.env.is_main:
            self._record({"type": "train", "step": progress.step, "loss": self.last_train_loss, "lr": lr,
                          "grad_norm": self.grad_norm, "tokens_per_s": rate, "elapsed_s": self.now})
        if config.max_steps is None:  # a time budget: the bar's total (and so its ETA) is an estimate
            steps_per_s = (progress.step - self.loop_start_step) / max(self.now - self.loop_start_s, 1e-9)
            bar.total = progress.step + max(1, int((config.time_budget - self.now) * steps_per_s))
        bar.set_postfix(loss=f"{self.last_train_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}", refresh=False)
        bar.refresh()
        progress.loss_sum, progress.loss_count = 0.0, 0
        self.log_start, self.log_steps = now, 0

    def _record(self, entry: dict) -> None:
        self.metrics.append(entry)
        self.trackers.log(entry)

    def evaluate(self) -> dict[str, float | int] | None:
        if self.config.eval_batches == 0:
            return None
        result = self.data.evaluate(self.net, self.env)  # every process scores its share
        if result is None:
            return None
        if self.env.is_main:
            self._record({"type": "eval", "step": self.progress.step, **result})
            logger.info("step %d: held-out loss %.4f, %.4f bits/byte", self.progress.step, result["loss"],
                        result["bits_per_byte"])
        self.last_eval = result
        return result

    def save(self) -> Path:
        self.progress.elapsed_s = self.now
        path = save_training_checkpoint(self.run_dir, self.net, self.optimizer, self.progress, self.config,
                                        self.tokenizer, self.env, self.data_identity, pause=self.pause,
                                        lora_base=self.lora_base, chat_template=self.chat_template)
        self.saved_step = self.progress.step
        return path


class Preempted(RuntimeError):
    """The run was asked to stop (SIGTERM, SIGUSR1) and saved a checkpoint; `--resume` continues
    it. The command line exits with PREEMPTED_EXIT_CODE."""


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: a temporary failure, try again (requeue and resume)


@dataclass
class StopRequests:
    interrupt: bool = False  # Ctrl-C: save after this step and stop; a second one stops at once
    preempt: bool = False  # SIGTERM or SIGUSR1 (clusters, SLURM --signal): save after this step and stop


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what clusters send before killing a job
SETUP_PREEMPTED = ("preempted (SIGTERM/SIGUSR1) while preparing the run, before it took a step: nothing new to "
                   "save; run the same command again (the token cache keeps the files already tokenised)")


@contextlib.contextmanager
def preempted_before_training() -> Iterator[None]:
    """Turn SIGTERM and SIGUSR1 before the first step (tokenising a corpus may take hours) into
    Preempted at once, so the command exits with PREEMPTED_EXIT_CODE and a scheduler requeues it;
    with no step taken there is nothing to save. Tokenising is interrupted as safely as by a kill:
    the cache keeps only complete files and parts. Only possible in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def preempt(signum, frame):
        if not received:  # a second signal while the first unwinds is the same request
            received.append(signum)
            raise Preempted(SETUP_PREEMPTED)

    previous = {signum: signal.signal(signum, preempt) for signum in STOP_SIGNALS}
    try:
        yield
    except Exception as error:
        # Under torchrun a collective fails when a preempted peer has left; this process was
        # signalled too, and the failure is that preemption.
        if received and not isinstance(error, Preempted):
            raise Preempted(SETUP_PREEMPTED) from error
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def stop_signals() -> Iterator[StopRequests]:
    """Turn Ctrl-C, SIGTERM and SIGUSR1 into requests checked between steps, so the run saves a
    consistent checkpoint before stopping. Only possible in the main thread."""
    requests = StopRequests()
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return

    def interrupt(signum, frame):
        if requests.interrupt:
            raise KeyboardInterrupt
        requests.interrupt = True
        logger.warning("interrupt: saving a checkpoint after this step (Ctrl-C again to abort)")

    def preempt(signum, frame):
        if not requests.preempt:
            logger.warning("%s: saving a checkpoint after this step, then stopping", signal.Signals(signum).name)
        requests.preempt = True

    handlers = {signal.SIGINT: interrupt, **{signum: preempt for signum in STOP_SIGNALS}}
    previous = {signum: signal.signal(signum, handler) for signum, handler in handlers.items()}
    try:
        yield requests
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
