"""What every TRL-backed stage shares: trainer arguments for CPU or GPU, a callback that forwards per-step metrics
to the tracker, the divergence rule (:class:`LossGuard`) that fails a stage whose training went wrong, and a weights
check."""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
from transformers import PrinterCallback, TrainerCallback

from roads.settings import TrainConfig
from roads.errors import ConfigError, DataError, TrainingError


class Tracker(Protocol):
    """Where a stage reports: the task layer passes one that writes to MLflow and the Prefect log."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def progress(self, message: str) -> None: ...


class NullTracker:
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def progress(self, message: str) -> None:
        pass


def world_size() -> int:
    """Data-parallel processes of this run: ``WORLD_SIZE``, which ``accelerate launch`` (torchrun) sets in every
    process it starts (roads.launch); 1 in the stage's own process."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def per_device_batch(global_batch: int, key: str = "batch_size") -> int:
    """The per-process share of a global batch: ``batch_size`` in the config is the global batch (examples per
    optimiser step, whatever the number of processes), so launched and in-process runs take the same steps on the
    same examples. The config check (``launch.num_processes``) guarantees it divides evenly."""
    n = world_size()
    if global_batch % n:
        raise ConfigError(f"{key} {global_batch} is not a multiple of the {n} launched processes; change "
                          "launch.num_processes or the batch size")
    return global_batch // n


MIXED_PRECISION_VAR = "ACCELERATE_MIXED_PRECISION"


@contextmanager
def mixed_precision(precision: str) -> Iterator[None]:
    """A stage run in this process under ``precision`` (``launch.mixed_precision`` with backend none: no, bf16,
    fp16): the variable ``accelerate launch`` sets in the processes it starts, which Transformers reads when bf16 and
    fp16 are off (:func:`trainer_args`), so the Trainer's accelerator autocasts its forward passes; the weights and
    the optimiser stay float32. It is set to the spec's value even for ``no``, so a variable left in the user's
    shell cannot change a stage its cache key says is float32; the old value comes back after."""
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("launch.mixed_precision: fp16 needs a GPU and torch sees none here; use bf16 (CPUs run it, "
                          "fast where they have AMX or AVX-512 BF16) or no")
    old = os.environ.get(MIXED_PRECISION_VAR)
    os.environ[MIXED_PRECISION_VAR] = precision
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(MIXED_PRECISION_VAR, None)
        else:
            os.environ[MIXED_PRECISION_VAR] = old


def trainer_args(cfg: TrainConfig, seed: int, output_dir: str, **extra: Any) -> dict[str, Any]:
    """Keyword arguments for any TRL config (SFTConfig, RewardConfig, DPOConfig, …). Under ``accelerate launch``
    each process takes ``batch_size / WORLD_SIZE`` examples per step (the global batch stays ``batch_size``) and
    mixed precision comes from accelerate (``ACCELERATE_MIXED_PRECISION``, read by transformers when bf16 and
    fp16 are off)."""
    return dict(
        output_dir=output_dir,
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.lr,
        lr_scheduler_type="linear",
        per_device_train_batch_size=per_device_batch(cfg.batch_size),
        max_length=cfg.max_length,
        logging_steps=cfg.logging_steps,
        seed=seed,
        data_seed=seed,
        report_to="none",
        save_strategy="no",
        bf16=False,  # TRL's default None becomes True, which CPUs reject
        activation_checkpointing=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=True,  # progress goes through the tracker: one line per logging step
        logging_nan_inf_filter=False,  # a NaN step is logged as NaN, not hidden in the window mean (LossGuard fails it)
        **extra,
    )


class LossGuard:
    """The divergence rule, checked on every optimiser step's own loss (what the trainer's ``training_step`` returns,
    or the hand-written loop's), never on the logged window mean, which Transformers' ``logging_nan_inf_filter``
    cleans of NaN and which averages a spike away. A stage fails (TrainingError: nothing is cached) when a step's
    loss is NaN or infinite, or when it exceeds ``factor`` × max(|the first step's loss|, 1).

    Why this rule: training from a sane start lowers its loss; a loss a hundred times its starting value has left the
    basin, whatever it does next (``sft.lr=1e3`` on the smoke study: 5.48 → 9,051,094 → 5.61, a finite, useless
    model that was cached). The first step is measured before any update, so it is the start's own loss; the floor 1
    keeps losses that start near or below 0 (RLOO/GRPO objectives, a reward model that already separates the pairs)
    from failing on noise. The factor is the stage's ``divergence_factor`` (default 100)."""

    def __init__(self, stage: str, factor: float):
        self.stage, self.factor = stage, factor
        self.first: tuple[int, float] | None = None  # (step, loss) of the first step

    def check(self, loss: float, step: int) -> None:
        if not math.isfinite(loss):
            raise TrainingError(f"{self.stage}: loss became {loss} at step {step}; lower {self.stage}.lr or check "
                                "the data — nothing was cached")
        if self.first is None:
            self.first = (step, loss)
            return
        first_step, first = self.first
        if loss > self.factor * max(abs(first), 1.0):
            scale = "its first value" if abs(first) >= 1.0 else "max(|its first value|, 1)"
            raise TrainingError(
                f"{self.stage}: loss rose from {first:.4g} at step {first_step} to {loss:.4g} at step {step} (more "
                f"than {self.factor:g}× {scale}): training diverged; lower {self.stage}.lr (or, if such a rise is "
                f"expected, raise {self.stage}.divergence_factor) — nothing was cached")


class StageCallback(TrainerCallback):
    """Forwards the trainer's logs as ``<stage>/<name>`` per step; a non-finite loss or gradient norm in them stops
    the stage. Its ``guard`` (:class:`LossGuard`, from ``cfg.divergence_factor``) is checked on every step by
    :func:`train`. Without ``cfg`` the guard has ``TrainConfig``'s default factor."""

    def __init__(self, stage: str, tracker: Tracker, cfg: TrainConfig | None = None):
        self.stage, self.tracker = stage, tracker
        factor = cfg.divergence_factor if cfg is not None else TrainConfig.model_fields["divergence_factor"].default
        self.guard = LossGuard(stage, factor)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        for key in ("loss", "train_loss", "grad_norm"):
            if key in logs and logs[key] is not None and not math.isfinite(float(logs[key])):
                raise TrainingError(
                    f"{self.stage}: {key} became {logs[key]} at step {state.global_step}; lower {self.stage}.lr "
                    "or check the data — nothing was cached"
                )
        numeric = {f"{self.stage}/{k}": float(v) for k, v in logs.items() if isinstance(v, (int, float))}
        self.tracker.log_metrics(numeric, step=state.global_step)
        if "loss" in logs:
            self.tracker.progress(f"step {state.global_step}/{state.max_steps} loss {float(logs['loss']):.4f}")


def quiet_libraries() -> None:
    """Library progress bars and load reports go off: stages report through the tracker, one line at a time."""
    import datasets
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    datasets.disable_progress_bars()
    disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def train(trainer) -> None:
    """``trainer.train()`` without the trainer's own printing (its logs reach the tracker through StageCallback), with
    the StageCallback's :class:`LossGuard` checking the loss of every step as ``training_step`` returns it."""
    trainer.remove_callback(PrinterCallback)
    callback = next((c for c in trainer.callback_handler.callbacks if isinstance(c, StageCallback)), None)
    if callback is not None:
        step = trainer.training_step

        def guarded_step(*args, **kwargs):
            loss = step(*args, **kwargs)
            callback.guard.check(float(loss), trainer.state.global_step + 1)  # global_step counts finished steps
            return loss

        trainer.training_step = guarded_step
    trainer.train()


def check_finite(model: torch.nn.Module, stage: str) -> None:
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise TrainingError(f"{stage}: weight {name} is not finite after training; lower {stage}.lr — nothing was cached")


def save_trained(stage: str, model: torch.nn.Module, tokenizer, trainer, out_dir) -> dict[str, float]:
    """After training: check the weights are finite, save model and tokenizer to ``out_dir``, return the final
    training metrics. Under FSDP or DeepSpeed the parameters are sharded over the processes: every process calls
    ``trainer.save_model`` (it gathers the full weights, a collective) and the main process writes them."""
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
        trainer.save_model(str(out_dir))
        if trainer.args.should_save:
            Path(out_dir, "training_args.bin").unlink(missing_ok=True)  # pickled args with temp paths: not content
            check_finite_saved(out_dir, stage)
    else:
        from roads.lora import merge_for_saving

        model = merge_for_saving(model, out_dir)  # LoRA: the adapter to adapter/, the merged weights here
        check_finite(model, stage)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    rule = getattr(trainer, "length_rule", None)
    lengths = rule.counts if rule is not None else {}
    write_trained(out_dir, len(trainer.train_dataset), stage, lengths)
    return {**final_train_metrics(stage, trainer.state.log_history), **length_metrics(stage, lengths)}


def check_finite_saved(out_dir, stage: str) -> None:
    """``check_finite`` on the weights a sharded run saved (the in-memory parameters are shards)."""
    from safetensors.torch import load_file

    for file in sorted(Path(out_dir).glob("*.safetensors")):
        for name, tensor in load_file(str(file)).items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise TrainingError(f"{stage}: weight {name} is not finite after training; lower {stage}.lr — "
                                    "nothing was cached")


def write_trained(out_dir, train_examples: int, stage: str | None = None, lengths: dict | None = None) -> None:
    """``trained.json``: which stage trained the model and on how many examples (the x axis of learning curves), and
    (``lengths``, :class:`LengthRule`'s counts) how many it was given, truncated and dropped for length."""
    from roads.artifacts import write_json

    write_json(f"{out_dir}/trained.json", {"train_examples": int(train_examples), "stage": stage,
                                           **({"lengths": lengths} if lengths else {})})


def length_metrics(stage: str, counts: dict) -> dict[str, float]:
    return {f"{stage}/{k}": float(v) for k, v in counts.items()}


class LengthRule:
    """No silent drops: what happens to the training examples longer than ``cfg.max_length`` tokens, applied to the
    rows as TRL tokenised them (``kind``: ``sft`` input_ids/labels, ``dpo`` prompt_ids/chosen_ids/rejected_ids,
    ``rm`` chosen_ids/rejected_ids, prompt included), and counted. ``cfg.too_long``: ``truncate`` cuts each sequence
    to ``max_length`` (keeping its start, TRL's rule; DPO's collator cuts them), and leaves out a row whose prompt
    alone fills it (no response token would be left: TRL drops those itself); ``drop`` leaves every long row out.

    The defaults reproduce TRL's own behaviour, so results are unchanged and now counted: SFT and DPO truncate,
    the reward model drops (RewardTrainer filters pairs longer than max_length). ``counts`` (the stage's metrics and
    ``trained.json``): examples (given), examples_trained, truncated, dropped_too_long, dropped_prompt_too_long.
    More than ``cfg.max_dropped_fraction`` of the examples dropped is a DataError naming the settings to raise."""

    def __init__(self, stage: str, cfg: TrainConfig, kind: str, tracker: Tracker | None = None):
        if kind not in ("sft", "dpo", "rm"):
            raise ValueError(f"unknown kind {kind!r}")
        self.stage, self.kind, self.tracker = stage, kind, tracker
        self.max_length, self.mode, self.max_fraction = cfg.max_length, cfg.too_long, cfg.max_dropped_fraction
        self.counts: dict[str, int] = {}

    def trl_max_length(self) -> int | None:
        """The max_length TRL's config gets: DPO's (its collator truncates); None for SFT and the reward model, whose
        rows this rule cuts or drops itself."""
        return self.max_length if self.kind == "dpo" else None

    def _length(self, row: dict) -> int:
        if self.kind == "sft":
            return len(row["input_ids"])
        if self.kind == "dpo":
            return len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))
        return max(len(row["chosen_ids"]), len(row["rejected_ids"]))

    def apply(self, given: int, dataset, name: str):
        """``dataset`` (TRL's prepared rows of the ``given`` rows handed to it) with the rule applied; the counts and
        the threshold for the training split (``name`` 'train')."""
        limit = self.max_length
        prompt_dropped = given - len(dataset)  # DPO: TRL left out the rows whose prompt alone fills max_length
        long = sum(self._length(r) > limit for r in dataset)
        if self.mode == "drop":
            dataset = dataset.filter(lambda r: self._length(r) <= limit)
            dropped_long, truncated = long, 0
        else:
            truncated = long
            if self.kind == "sft":  # TRL's truncation, then its rule: a row with no response token left is dropped
                dataset = dataset.map(lambda r: {"input_ids": r["input_ids"][:limit], "labels": r["labels"][:limit]})
                before = len(dataset)
                dataset = dataset.filter(lambda r: any(label != -100 for label in r["labels"]))
                prompt_dropped += before - len(dataset)
            elif self.kind == "rm":
                dataset = dataset.map(lambda r: {"chosen_ids": r["chosen_ids"][:limit],
                                                 "rejected_ids": r["rejected_ids"][:limit]})
            truncated -= prompt_dropped if self.kind == "sft" else 0
            dropped_long = 0
        if name != "train":
            return dataset
        self.counts = {"examples": given, "examples_trained": len(dataset), "truncated": truncated,
                       "dropped_too_long": dropped_long, "dropped_prompt_too_long": prompt_dropped}
        dropped = dropped_long + prompt_dropped
        if self.tracker is not None and (dropped or truncated):
            self.tracker.progress(f"{given} examples, {truncated} truncated to max_length {limit} tokens, {dropped} "
                                  f"dropped ({dropped_long} longer than it, too_long={self.mode}; {prompt_dropped} "
                                  "whose prompt alone fills it)")
        check_dropped(self.stage, dropped, given, self.max_fraction, limit)
        return dataset


def check_dropped(stage: str, dropped: int, given: int, max_fraction: float, max_length: int) -> None:
    """More than ``max_fraction`` of ``given`` examples dropped for length is an error naming the settings."""
    if given and dropped / given > max_fraction:
        raise DataError(
            f"{stage}: {dropped} of {given} training examples ({dropped / given:.0%}) do not fit in {stage}.max_length "
            f"= {max_length} tokens and were dropped, more than {stage}.max_dropped_fraction = {max_fraction:g}; "
            f"raise {stage}.max_length (or {stage}.max_dropped_fraction to train on the rest)")


class LengthRuled:
    """A TRL trainer (mixin before SFTTrainer, DPOTrainer or RewardTrainer) whose prepared datasets go through a
    :class:`LengthRule` (``length_rule=``; None: TRL's own handling, uncounted)."""

    def __init__(self, *args, length_rule: LengthRule | None = None, **kwargs):
        self.length_rule = length_rule
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, dataset, *args, **kwargs):
        prepared = super()._prepare_dataset(dataset, *args, **kwargs)
        if self.length_rule is None:
            return prepared
        name = kwargs.get("dataset_name", args[-1] if args else "train")
        return self.length_rule.apply(len(dataset), prepared, name)


def first_fraction(rows: list, fraction: float) -> list:
    """The first ``fraction`` of ``rows`` (at least one): the nested subsets of a learning curve."""
    return rows[: max(1, round(len(rows) * fraction))]


def final_train_metrics(stage: str, log_history: list[dict]) -> dict[str, float]:
    """The last value of every numeric training log, as ``<stage>/<name>``."""
    out: dict[str, float] = {}
    for entry in log_history:
        for key, value in entry.items():
            if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                out[f"{stage}/{key}"] = float(value)
    return out


MAX_GRAD_NORM = 1.0


def train_loop(stage: str, cfg: TrainConfig, seed: int, model: torch.nn.Module, n: int,
               step_loss: Callable[[list[int]], tuple[torch.Tensor, dict[str, float]]], tracker: Tracker,
               after_step: Callable[[], None] | None = None,
               parameters: Iterable[torch.nn.Parameter] | None = None) -> dict[str, float]:
    """The loop of the stages whose loss TRL does not have (local_rm, q_sft, ivl), top to bottom: ``cfg.epochs``
    passes over ``n`` examples in batches of ``cfg.batch_size``, shuffled each epoch by a generator seeded with
    ``seed``; AdamW (no weight decay) at ``cfg.lr`` decaying linearly to 0; gradients clipped at norm 1.
    ``step_loss(batch indices) -> (loss, extra metrics)``; ``after_step`` runs after each optimiser step (Q-SFT's
    Polyak update). A non-finite gradient, or a loss the divergence rule (:class:`LossGuard`, ``cfg.divergence_factor``)
    rejects, raises TrainingError naming ``<stage>.lr``. Every
    ``cfg.logging_steps`` steps (and at the last) the window means of the loss and extras are logged as
    ``<stage>/<name>``. The process's global RNG is left as it was. Returns the last window's means,
    ``<stage>/train_loss`` (the mean over all steps) and ``<stage>/steps``. It runs in one process: its stages are
    not launchable (``roads.config.LAUNCH_STAGES``; they ignore ``launch``)."""
    per_epoch = math.ceil(n / cfg.batch_size)
    total = max(1, math.ceil(cfg.epochs * per_epoch))
    params = list(parameters if parameters is not None else model.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, (total - s) / total))
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    window: dict[str, list[float]] = {}
    logged: dict[str, float] = {}
    guard = LossGuard(stage, cfg.divergence_factor)
    step = 0
    model.train()
    with torch.random.fork_rng():  # the process's global generator is left as it was
        torch.manual_seed(seed)  # dropout, if the model has any
        while step < total:
            order = torch.randperm(n, generator=generator).tolist()
            for start in range(0, n, cfg.batch_size):
                if step == total:
                    break
                loss, extra = step_loss(order[start:start + cfg.batch_size])
                step += 1
                value = float(loss.detach())
                guard.check(value, step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM))
                if not math.isfinite(grad_norm):
                    raise TrainingError(f"{stage}: gradient norm became {grad_norm} at step {step}; lower "
                                        f"{stage}.lr or check the data — nothing was cached")
                optimizer.step()
                schedule.step()
                if after_step is not None:
                    after_step()
                losses.append(value)
                for key, v in {"loss": value, **extra}.items():
                    window.setdefault(key, []).append(float(v))
                if step % cfg.logging_steps == 0 or step == total:
                    logged = {f"{stage}/{k}": sum(v) / len(v) for k, v in window.items()}
                    tracker.log_metrics(logged, step=step)
                    tracker.progress(f"step {step}/{total} " + " ".join(f"{k} {sum(v) / len(v):.4f}"
                                                                        for k, v in window.items()))
                    window = {}
    model.eval()
    return {**logged, f"{stage}/train_loss": sum(losses) / len(losses), f"{stage}/steps": float(total)}
