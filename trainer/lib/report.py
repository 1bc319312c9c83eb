"""Every stage's held-out result, before and after training, in one small file.

`<out_dir>/<stage>/metrics.json` = {"<metric>": {"before": x, "after": y, "higher_is_better": bool}}:
"before" is the model the stage starts from (pretraining: the untrained model; SFT, DPO, ...: the
parent checkpoint), "after" the model it saves. The same figures go to the log and to TensorBoard
(`heldout/<metric>` at step 0 and at the last step). On `--resume` the "before" of the first run is
kept, so the file always compares the stage's start with its end.

A metric that is a share of n independent held-out items (an accuracy) is recorded with `n=`; the
file then also holds "n" and the binomial standard errors "before_stderr" / "after_stderr"
(sqrt(p (1 - p) / n)), and the log prints them, so a change smaller than about two standard errors
is not read as progress.

`<out_dir>/<stage>/seen.json` = {"step": s, "samples": n, "tokens": t}: how much training data the
stage went through (samples: conversations, pairs, prompts, blocks; tokens where the trainer counts
them), for the pipeline's report card.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from trainer.lib.metrics import binomial_stderr
from trainer.lib.runtime import StageRun, is_main_process

METRICS_FILE = "metrics.json"
SEEN_FILE = "seen.json"


def read_metrics(stage_dir: Path) -> dict[str, dict]:
    """A stage's metrics.json ({} when the stage has not written one)."""
    path = stage_dir / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass
class StageReport:
    run: StageRun
    resume: bool = False
    metrics: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.earlier = read_metrics(self.run.dir) if self.resume else {}

    def before(self, name: str, value: float | Callable[[], float], higher_is_better: bool,
               n: int | None = None, baseline: float | None = None) -> float:
        """Record the starting value, or measure it by calling `value()`; on --resume the first run's
        value is kept and nothing is measured. `n`: the value is a share of n held-out items;
        `baseline`: a reference to read it against (pretraining: the unigram loss). Returns it."""
        earlier = self.earlier.get(name, {}).get("before")
        if earlier is None:
            earlier = value() if callable(value) else value
        self.metrics[name] = {"before": earlier, "after": None, "higher_is_better": higher_is_better}
        if n is not None:
            self.metrics[name].update(n=n, before_stderr=binomial_stderr(earlier, n))
        if baseline is not None:
            self.metrics[name]["baseline"] = baseline
        return earlier

    def before_each(self, measure: Callable[[], dict[str, float]], higher_is_better: bool,
                    n: int | None = None) -> None:
        """`before` for several metrics measured by one call (not made when --resume found them)."""
        known = {k: m["before"] for k, m in self.earlier.items() if m.get("before") is not None}
        for name, value in (known or measure()).items():
            self.before(name, value, higher_is_better, n)

    def after(self, name: str, value: float) -> None:
        m = self.metrics[name]
        m["after"] = value
        if "n" in m:
            m["after_stderr"] = binomial_stderr(value, m["n"])

    def save(self, step: int, samples: int | None = None, tokens: int | None = None) -> Path:
        """Write metrics.json (and seen.json: `samples`/`tokens` trained on), log one line per metric
        and add `heldout/<metric>` to TensorBoard."""
        path = self.run.dir / METRICS_FILE
        if not is_main_process():
            return path
        path.write_text(json.dumps(self.metrics, indent=1) + "\n")
        seen = {"step": step, "samples": samples, "tokens": tokens or None}
        (self.run.dir / SEEN_FILE).write_text(json.dumps(seen) + "\n")
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(str(self.run.dir / "runs")) as writer:
            for name, m in self.metrics.items():
                if m["before"] is not None:
                    writer.add_scalar(f"heldout/{name}", m["before"], 0)
                if m["after"] is not None:
                    writer.add_scalar(f"heldout/{name}", m["after"], step)
        for name, m in self.metrics.items():
            better = "higher" if m["higher_is_better"] else "lower"
            se = {w: f" +- {m[f'{w}_stderr']:.3f}" if f"{w}_stderr" in m else "" for w in ("before", "after")}
            size = f", n={m['n']}" if "n" in m else ""
            logger.info(f"held-out {name}: {_fmt(m['before'])}{se['before']} before -> {_fmt(m['after'])}{se['after']} "
                        f"after ({better} is better{size})")
        logger.info(f"wrote {path}")
        return path


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def trainer_seen(trainer) -> dict[str, int | None]:
    """`samples` and `tokens` a `transformers.Trainer` has trained on, as `StageReport.save` takes them:
    optimizer steps x per-device batch x gradient accumulation x processes (the last batch of an
    epoch may be smaller), and the Trainer's own count of input tokens."""
    a, state = trainer.args, trainer.state
    samples = state.global_step * a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size
    return {"samples": samples, "tokens": int(state.num_input_tokens_seen or 0) or None}
