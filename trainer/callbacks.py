"""Trainer callbacks every stage shares: readable logs, perplexity, and sample generations.

They plug into any `transformers.Trainer` (trl's trainers are Trainers too) through
`attach_callbacks`, which puts them *before* the TensorBoard writer so the metrics they add
(perplexity) are written along with the rest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from loguru import logger
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations import TensorBoardCallback


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
    """At every evaluation, greedy-decodes a few prompts and logs them (console + TensorBoard text),
    so a learner watches the model go from noise to sentences."""

    def __init__(self, trainer: Trainer, tokenizer, prompts: Sequence[str], chat: bool, max_new_tokens: int = 40):
        self.trainer, self.tokenizer, self.prompts = trainer, tokenizer, list(prompts)
        self.chat, self.max_new_tokens = chat, max_new_tokens

    def _writer(self):
        for cb in self.trainer.callback_handler.callbacks:
            if isinstance(cb, TensorBoardCallback):
                return cb.tb_writer
        return None

    @torch.no_grad()
    def samples(self, model) -> list[str]:
        was_training = model.training
        model.eval()
        out = []
        for prompt in self.prompts:
            if self.chat:
                ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                         add_generation_prompt=True, return_tensors="pt",
                                                         return_dict=True)["input_ids"]
            else:
                ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
            ids = ids.to(model.device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.max_new_tokens,
                                 do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
            out.append(prompt + " -> " + self.tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
        model.train(was_training)
        return out

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model=None, **kwargs) -> None:
        if not state.is_world_process_zero or model is None or not self.prompts:
            return
        texts = self.samples(model)
        for t in texts:
            logger.info(f"sample: {t}")
        writer = self._writer()
        if writer is not None:
            writer.add_text("samples", "\n\n".join(f"`{t}`" for t in texts), state.global_step)


def attach_callbacks(trainer: Trainer, *callbacks: TrainerCallback, perplexity: bool = True) -> Trainer:
    """Our callbacks first (MetricsCallback included), then the library's (TensorBoard, progress)."""
    handler = trainer.callback_handler
    for cb in reversed([MetricsCallback(perplexity), *callbacks]):
        handler.callbacks.insert(0, cb)
    return trainer
