"""lm-evaluation-harness (0.4.x) adapter: score an Andromeda checkpoint on harness tasks.

    lm = AndromedaLM(checkpoint="runs/demo", batch_size=8, device="cpu")
    results = lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])
    # or by name: simple_evaluate(model="andromeda", model_args="checkpoint=runs/demo", ...)
    results = run_lm_eval("runs/demo", ["my_task"], include_path="my_tasks/")
    print(format_table(results))

`AndromedaLM` implements the harness's three request types on our own model:

- loglikelihood: (context, continuation) pairs, right-padded into batches (causal attention means
  trailing padding never changes a real token's logits), scored in fp32; `is_greedy` says whether
  every continuation token is the argmax.
- loglikelihood_rolling: the harness's own windows (`lm_eval.utils.get_rolling_token_windows`) of
  `max_length` tokens, the first conditioned on eos (our start-of-document token), each token
  predicted exactly once. On a text of a multiple of `max_length` tokens these are the windows
  of `andromeda eval --seq-len max_length`, so the two give the same total loss.
- generate_until: batches of left-padded prompts through the model's KV-cached `generate`; a row
  stops at eos or once its text contains a stop string, the batch as soon as every row stopped,
  and the text is cut before the first stop string.

The checkpoint is an Andromeda checkpoint or run folder, or a Hugging Face folder written by
`andromeda.interop.hf.export_hf`. Needs the harness: `pip install -e '.[eval]'` in the andromeda checkout.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

EVAL_EXTRA = "pip install -e '.[eval]' in the andromeda checkout (PyPI's andromeda is an unrelated project)"

try:
    from lm_eval import utils as lm_eval_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as err:  # pragma: no cover - exercised without the extra installed
    raise ImportError(f"andromeda.interop.lm_eval needs lm-evaluation-harness: {EVAL_EXTRA}") from err

from ..checkpoint import attach_lora, load_checkpoint_tokenizer, load_for_inference, open_model_source
from ..inference.generate import stream
from ..model import Transformer
from ..tokenizers import Tokenizer

logger = logging.getLogger(__name__)


def _device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return None if dtype == "auto" else dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"dtype must be a torch dtype name such as 'float32' or 'bfloat16', got {dtype!r}")
    return value


def _batch_size(value: int | str) -> int:
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"batch_size must be a positive integer, got {value!r} (automatic sizing is not supported)"
        ) from None
    if size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {size}")
    return size


def load_model(
    checkpoint: str | Path, device: torch.device, dtype: torch.dtype | None, lora: str | Path | None = None
) -> tuple[Transformer, Tokenizer]:
    """The model (as `checkpoint.load_for_inference` loads it for scoring) and tokenizer of any
    model folder: an Andromeda checkpoint or run folder, a quantized checkpoint, an exported
    Hugging Face folder; with the LoRA adapter `lora` applied."""
    source = attach_lora(open_model_source(checkpoint), lora)
    tokenizer = load_checkpoint_tokenizer(source)  # before the weights: a folder without one fails at once
    return load_for_inference(source, device=device, dtype=dtype, decoding=False), tokenizer


@register_model("andromeda")
class AndromedaLM(TemplateLM):
    """An Andromeda model as an lm-evaluation-harness LM.

    checkpoint: an Andromeda checkpoint or run folder, or an exported Hugging Face folder; or
        pass `model` (an Andromeda or Transformer) and `tokenizer` instead.
    batch_size: sequences per forward pass. device: "cpu", "cuda", ... (default: cuda if there).
    dtype: cast the weights ("float32", "bfloat16"); default as saved.
    max_length: the context in tokens (default and maximum: the model's max_seq_len).
    max_gen_toks: new tokens per generate_until request unless the task says otherwise.
    """

    def __init__(
        self,
        checkpoint: str | Path | None = None,
        batch_size: int | str = 1,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        *,
        model: Transformer | None = None,
        tokenizer: Tokenizer | None = None,
        max_batch_size: int | None = None,  # passed by simple_evaluate; sizes are never automatic
        lora: str | Path | None = None,
    ) -> None:
        super().__init__()
        self._device = _device(device)
        if (checkpoint is None) == (model is None):
            raise ValueError("give exactly one of checkpoint (a folder) and model (with its tokenizer)")
        if checkpoint is not None:
            model, tokenizer = load_model(checkpoint, self._device, _dtype(dtype), lora)
        elif tokenizer is None:
            raise ValueError("a model passed directly needs its tokenizer")
        else:
            model = model.to(self._device, _dtype(dtype)) if dtype is not None else model.to(self._device)
        self.net: Transformer = getattr(model, "Andromeda", model)  # the seed's face holds it there
        self.net.eval()
        self.tokenizer = tokenizer
        self._batch_size = _batch_size(batch_size)
        limit = self.net.config.max_seq_len
        self._max_length = limit if max_length is None else int(max_length)
        if not 1 <= self._max_length <= limit:
            raise ValueError(f"max_length must be in 1..{limit} (the model's max_seq_len), got {max_length}")
        self._max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------ what the harness reads

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name", type(self.tokenizer).__name__)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        ids = self.tokenizer.encode(string)  # no special tokens are ever added
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: Sequence[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(list(ids))

    def get_model_info(self) -> dict[str, Any]:
        with torch.device("meta"):  # counted as built: quantized and prepacked weights are buffers
            parameters = Transformer(self.net.config).num_parameters()
        return {"model_num_parameters": parameters, "model_dtype": str(self.net.token_emb.weight.dtype)}

    # ------------------------------------------------------------------ loglikelihood

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        results = self._score([(context, continuation) for _, context, continuation in requests], disable_tqdm)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    @torch.inference_mode()
    def _score(
        self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool = True
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is greedy) per (context, continuation)
        pair of token lists; contexts longer than the window lose their oldest tokens."""
        window = self.max_length
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        rows = []
        for index, (context, continuation) in enumerate(pairs):
            if not continuation:
                results[index] = (0.0, True)
                continue
            if len(continuation) > window:
                raise ValueError(f"a continuation of {len(continuation)} tokens exceeds max_length {window}")
            if not context:
                raise ValueError("a loglikelihood request needs at least one context token")
            rows.append((index, (context + continuation)[-(window + 1):][:-1], continuation))
        rows.sort(key=lambda row: -len(row[1]))  # longest first: similar lengths share a batch
        batches = range(0, len(rows), self.batch_size)
        for start in tqdm(batches, disable=disable_tqdm, desc="Scoring"):
            batch = rows[start : start + self.batch_size]
            width = len(batch[0][1])
            tokens = torch.full((len(batch), width), self.eot_token_id, dtype=torch.long)
            for row, (_, inputs, _) in enumerate(batch):
                tokens[row, : len(inputs)] = torch.tensor(inputs)  # right-padded
            logprobs = F.log_softmax(self.net(tokens.to(self.device)).float(), dim=-1)  # (B, T, V)
            for row, (index, inputs, continuation) in enumerate(batch):
                picked = logprobs[row, len(inputs) - len(continuation) : len(inputs)]  # (n, V)
                target = torch.tensor(continuation, device=picked.device)
                total = picked.gather(1, target[:, None]).sum()
                results[index] = (float(total), bool((picked.argmax(dim=-1) == target).all()))
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for owner, (text,) in enumerate(request.args for request in requests):
            pieces = lm_eval_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            )
            for window in map(lm_eval_utils.make_disjoint_window, pieces):
                windows.append(window)
                owners.append(owner)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._score(windows, disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            key = json.dumps(request.args[1], sort_keys=True, default=str)
            groups.setdefault(key, []).append(index)
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="Generating")
        for indices in groups.values():
            until, max_new, sampling = self._generation_settings(requests[indices[0]].args[1])
            room = min(self.max_length, self.net.config.max_seq_len) - max_new
            if room < 1:
                raise ValueError(
                    f"max_gen_toks {max_new} leaves no room for a prompt in max_length {self.max_length}"
                )
            prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=room) or [self.eot_token_id]
                       for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                texts = self._generate([prompts[i] for i in batch], max_new, until, sampling)
                for index, text in zip(batch, texts):
                    results[index] = text
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
                progress.update(len(batch))
        progress.close()
        return results  # type: ignore[return-value]

    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> tuple[list[str], int, dict[str, Any]]:
        """(stop strings, new tokens, our sampling arguments) from a task's generation_kwargs."""
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_new = self.max_gen_toks
        for name in ("max_gen_toks", "max_new_tokens", "max_tokens"):
            if name in kwargs:
                max_new = int(kwargs.pop(name))
                break
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
        sampling: dict[str, Any] = {"temperature": temperature if do_sample else 0.0}
        if do_sample:
            for name in ("top_k", "top_p", "min_p"):
                if kwargs.get(name) is not None:
                    sampling[name] = kwargs.pop(name)
        for name in ("top_k", "top_p", "min_p"):
            kwargs.pop(name, None)
        if kwargs:
            logger.warning("AndromedaLM ignores the generation arguments %s", sorted(kwargs))
        return until, max_new, sampling

    def _generate(
        self, prompts: list[list[int]], max_new: int, until: list[str], sampling: dict[str, Any]
    ) -> list[str]:
        """Continue each prompt (left-padded together, KV-cached) until eos, a stop string or
        `max_new` tokens; the texts are cut before their first stop string."""
        eos = self.eot_token_id
        rows: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        steps = stream(self.net, [torch.tensor(p) for p in prompts], max_new, eos_token=eos, **sampling)
        for step in steps:
            for row, token in enumerate(step.tolist()):
                if done[row]:
                    continue
                if token == eos:
                    done[row] = True
                    continue
                rows[row].append(token)
                done[row] = bool(until) and any(stop in self.tok_decode(rows[row]) for stop in until)
            if all(done):
                steps.close()  # every row ended in eos or a stop string: no more decoding
                break
        return [_cut(self.tok_decode(row), until) for row in rows]


def _cut(text: str, until: list[str]) -> str:
    """`text` before the earliest occurrence of any non-empty stop string."""
    ends = [text.find(stop) for stop in until if stop]
    ends = [end for end in ends if end >= 0]
    return text[: min(ends)] if ends else text


# --------------------------------------------------------------------------- the harness run


def run_lm_eval(
    checkpoint: str | Path,
    tasks: str | Sequence[str],
    include_path: str | Path | Sequence[str | Path] | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    output: str | Path | None = None,
    device: str | None = None,
    *,
    dtype: str | None = None,
    max_length: int | None = None,
    include_defaults: bool = True,
    bootstrap_iters: int = 100_000,
    model: Transformer | None = None,
    tokenizer: Tokenizer | None = None,
    lora: str | Path | None = None,
) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` of the checkpoint on `tasks` (a list, or names joined by commas);
    returns the harness's results dict, also written as JSON to `output` when given.

    include_path: folders of task YAMLs to add to the harness's own (`include_defaults=False`
    skips indexing the built-in tasks, which is faster). limit: examples per task (a fraction if
    below 1). Unknown task names raise a ValueError listing them.
    """
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    names = [n for n in names if n]
    if not names:
        raise ValueError("no tasks given")
    paths = None
    if include_path is not None:
        paths = [str(p) for p in ([include_path] if isinstance(include_path, (str, Path)) else include_path)]
        absent = [p for p in paths if not Path(p).is_dir()]
        if absent:
            raise FileNotFoundError(f"include path(s) {absent} are not folders")
    manager = TaskManager(include_path=paths, include_defaults=include_defaults)
    known = set(manager.all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        where = f" or in {paths}" if paths else "; pass --include-path for local task YAMLs"
        raise ValueError(f"unknown lm-eval tasks {unknown}: not among the harness's tasks{where}")
    lm = AndromedaLM(checkpoint=None if model is not None else checkpoint, batch_size=batch_size, device=device,
                     dtype=dtype, max_length=max_length, model=model, tokenizer=tokenizer, lora=lora)
    results = simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                              bootstrap_iters=bootstrap_iters, log_samples=False)
    args = f"checkpoint={checkpoint}" if model is None else "model=(in memory)"
    results["config"].update(model="andromeda", model_args=args)
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


def format_table(results: dict[str, Any]) -> str:
    """The harness's markdown table of `results` (and of its groups, if any)."""
    from lm_eval.utils import make_table

    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table


__all__ = ["EVAL_EXTRA", "AndromedaLM", "format_table", "load_model", "run_lm_eval"]
