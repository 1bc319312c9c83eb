"""The reward model of stage 5 as the other stages use it: loading it, and scoring answers.

r(prompt, answer) is a `num_labels=1` MiniMindForSequenceClassification read at the last real token
of the whole conversation, rendered by the chat template exactly as trl's RewardTrainer renders its
training pairs. PPO scores its rollouts with it (and starts its critic from it); the evaluation
tasks measure it with `metrics.pairwise_accuracy`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from loguru import logger

from trainer.lib.generation import Prompt, chat_ids, pad
from trainer.lib.metrics import pairwise_accuracy
from trainer.lib.stages import StageError


def load_reward_model(path: str | Path, dtype: torch.dtype = torch.float32, pad_token_id: int | None = None):
    """A `num_labels=1` sequence classifier from a reward checkpoint, or from a CausalLM checkpoint
    (the backbone `model.*` loads, `score` is new, `lm_head` is dropped). Anything else missing is
    a StageError: a reward model on an uninitialised backbone would score noise."""
    from transformers import AutoModelForSequenceClassification

    import model as _registers_minimind  # noqa: F401  (Auto-class registration)

    extra = {} if pad_token_id is None else {"pad_token_id": pad_token_id}
    rm, info = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=dtype, output_loading_info=True, **extra)
    missing = set(info["missing_keys"])
    if not missing <= {"score.weight"}:
        raise StageError(f"{path}: loading a reward model left backbone weights uninitialised: {sorted(missing)}")
    if missing or info["unexpected_keys"]:
        logger.info(f"reward model from {path}: {len(rm.state_dict()) - len(missing)} backbone tensors loaded, "
                    f"{'new score head' if missing else 'score head loaded'}"
                    f"{', dropped ' + ', '.join(sorted(info['unexpected_keys'])) if info['unexpected_keys'] else ''}")
    return rm


def conversation(prompt: Prompt, completion: str) -> list[dict] | str:
    """The prompt with the completion appended as the assistant turn (or the concatenated string)."""
    if isinstance(prompt, str):
        return prompt + completion
    return list(prompt) + [{"role": "assistant", "content": completion}]


@torch.no_grad()
def reward_scores(reward_model, tokenizer, prompts: Sequence[Prompt], completions: Sequence[str],
                  batch_size: int = 16) -> torch.Tensor:
    """r(prompt, completion) for each pair [N], right-padded batches, the head read at each row's
    last real token (the model's forward does that from the attention mask)."""
    device = next(reward_model.parameters()).device
    was_training = reward_model.training
    reward_model.eval()
    rows = []
    for p, c in zip(prompts, completions):
        conv = conversation(p, c)
        rows.append(tokenizer(conv + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
                    if isinstance(conv, str) else chat_ids(tokenizer, conv))
    scores = []
    for i in range(0, len(rows), batch_size):
        ids, mask = pad(rows[i:i + batch_size], tokenizer.pad_token_id, "right")
        logits = reward_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        scores.append(logits[:, 0].float().cpu())
    reward_model.train(was_training)
    return torch.cat(scores) if scores else torch.zeros(0)


def pair_scores(reward_model, tokenizer, pairs: Sequence[dict], batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(r(chosen), r(rejected)) [N] each for preference records {"prompt", "chosen", "rejected"}."""
    prompts = [p["prompt"] for p in pairs]
    return (reward_scores(reward_model, tokenizer, prompts, [p["chosen"][-1]["content"] for p in pairs], batch_size),
            reward_scores(reward_model, tokenizer, prompts, [p["rejected"][-1]["content"] for p in pairs], batch_size))


def reward_model_accuracy(reward_model, tokenizer, pairs: Sequence[dict], batch_size: int = 16) -> float:
    """pairwise_accuracy(r(chosen), r(rejected)) on preference records."""
    return pairwise_accuracy(*pair_scores(reward_model, tokenizer, pairs, batch_size))
