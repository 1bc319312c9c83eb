"""Trainer callbacks every Trainer stage shares: readable logs, perplexity, sample generations and
a held-out measurement during training.

They plug into any `transformers.Trainer` (trl's trainers are Trainers too) through
`attach_callbacks`, which puts them *before* the TensorBoard writer so the metrics they add
(perplexity) are written along with the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from loguru import logger
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations import TensorBoardCallback

from trainer.lib.generation import GREEDY, Prompt, generate
from trainer.lib.stages import mark_complete


def tensorboard_writer(trainer: Trainer):
    """The SummaryWriter of the trainer's TensorBoard callback (None before training starts)."""
    return next((cb.tb_writer for cb in trainer.callback_handler.callbacks
                 if isinstance(cb, TensorBoardCallback)), None)


class MetricsCallback(TrainerCallback):
    """Copies every log line into train.log and, for language-model losses (pretraining, SFT),
    adds `eval_perplexity = exp(eval_loss)`; a DPO or reward loss has no perplexity."""

    def __init__(self, perplexity: bool = True):
        self.perplexity = perplexity

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict | None = None, **kwargs) -> None:
        if not logs:
            return
        if self.perplexity and "eval_loss" in logs:
            logs["eval_perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
        if state.is_world_process_zero:
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in logs.items()
                     if k not in ("total_flos", "num_input_tokens_seen")}
            logger.debug(f"step {state.global_step}/{state.max_steps}: {shown}")  # train.log; the progress bar prints too


class SampleCallback(TrainerCallback):
    """At every evaluation, greedy-decodes a few prompts (chat messages or plain text) and logs them
    (console + TensorBoard text), so a learner watches the model go from noise to sentences."""

    def __init__(self, trainer: Trainer, tokenizer, prompts: Sequence[str], chat: bool, max_new_tokens: int = 40):
        self.trainer, self.tokenizer, self.texts = trainer, tokenizer, [p for p in prompts if p.strip()]
        self.prompts: list[Prompt] = [[{"role": "user", "content": p}] if chat else p for p in self.texts]
        self.max_new_tokens = max_new_tokens

    def samples(self, model) -> list[str]:
        replies = generate(model, self.tokenizer, self.prompts, self.max_new_tokens, GREEDY).texts
        return [f"{p} -> {r}" for p, r in zip(self.texts, replies)]

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model=None, **kwargs) -> None:
        if model is None or not self.prompts:
            return
        # Every process decodes: under ZeRO-3 or FSDP each forward gathers the sharded weights from all
        # of them, and a decode on the main process alone waits for the others forever.
        texts = self.samples(model)
        if not state.is_world_process_zero:
            return
        for t in texts:
            logger.info(f"sample: {t}")
        writer = tensorboard_writer(self.trainer)
        if writer is not None:
            writer.add_text("samples", "\n\n".join(f"`{t}`" for t in texts), state.global_step)


class HeldOutMetricCallback(TrainerCallback):
    """For trl stages: `measure(model) -> float | None` on held-out data at the start of training,
    every `every` steps (0 = never) and at the end, on every process; logged and written to
    TensorBoard under `tag` by the main one. `history` = [(step, value)]: first = before, last = after."""

    def __init__(self, trainer, tag: str, measure: Callable[[torch.nn.Module], float | None], every: int = 0) -> None:
        self.trainer, self.tag, self.measure, self.every = trainer, tag, measure, every
        self.history: list[tuple[int, float]] = []
        self._written = 0

    def _measure(self, state, model) -> None:
        if model is None:
            return
        if self.history and self.history[-1][0] == state.global_step:
            return
        value = self.measure(model)  # on every process, as SampleCallback decodes (sharded weights)
        if value is not None:
            self.history.append((state.global_step, value))
            if state.is_world_process_zero:
                logger.info(f"step {state.global_step}: held-out {self.tag.split('/')[-1]} {value:.4f}")

    def _write(self) -> None:
        writer = tensorboard_writer(self.trainer)
        if writer is None:  # not created yet (train begin) or no TensorBoard: written later
            return
        for step, value in self.history[self._written:]:
            writer.add_scalar(self.tag, value, step)
        self._written = len(self.history)
        writer.flush()

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        self._measure(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs) -> None:
        if self.every > 0 and state.global_step % self.every == 0:
            self._measure(state, model)
        self._write()

    def on_train_end(self, args, state, control, model=None, **kwargs) -> None:
        self._measure(state, model)
        self._write()  # our callbacks run before the TensorBoard callback closes its writer


class CompleteCheckpointCallback(TrainerCallback):
    """Marks `checkpoint-<step>` complete once the Trainer has written all of it (`on_save` runs
    after weights, optimizer, scheduler, RNG and trainer_state.json), so a run killed mid-save
    leaves a dir that `stages.checkpoints` ignores and `--resume` starts from the previous one."""

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and ckpt.is_dir():
            mark_complete(ckpt)


def attach_callbacks(trainer: Trainer, *callbacks: TrainerCallback, perplexity: bool = True) -> Trainer:
    """Our callbacks first (MetricsCallback and the checkpoint marker included), then the library's
    (TensorBoard, progress)."""
    handler = trainer.callback_handler
    for cb in reversed([MetricsCallback(perplexity), CompleteCheckpointCallback(), *callbacks]):
        handler.callbacks.insert(0, cb)
    return trainer
