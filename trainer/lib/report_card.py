"""The course's report card: what every stage achieved, read back from what the stages left on disk.

Nothing is re-measured here except the sample chats: each stage already wrote its held-out result
(`metrics.json`, before -> after), what it trained on (`seen.json`) and its curves (TensorBoard).

    report = collect(out_dir, seconds)                  # report.json's content
    write_report(out_dir, seconds, chat_prompts)        # <out_dir>/report.md, report.json, plots/<stage>.png

report.json = {"stages": {"<stage>": {"seconds": s, "parameters": p, "samples": n, "tokens": t,
"checkpoint": path, "metrics": {"<name>": {"before": x, "after": y, "higher_is_better": bool, ...}}}},
"environment": {...}}
"""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainer.lib.curves import plot_stage, read_scalars
from trainer.lib.report import SEEN_FILE, read_metrics
from trainer.lib.stages import STAGES, stage_output

CHAT_STAGES = ("sft", "dpo", "grpo", "ppo")
DEFAULT_CHAT_PROMPTS = (
    "What is 47 + 25?",
    "Mia has 12 apples. Tom gives her 7 more. How many apples does Mia have now?",
    "Ben has a yellow cup and Amy has a pink pen. Who has the yellow cup?",
)
METRIC_NAMES = {
    "bytes_per_token": "bytes per token (held-out text)",
    "eval_loss": "held-out loss (nats/token)",
    "eval_perplexity": "held-out perplexity",
    "answer_accuracy": "held-out answer accuracy",
    "pref_acc": "held-out preference accuracy",
    "loglik_acc": "held-out log-likelihood accuracy",
    "accuracy": "held-out RL-prompt accuracy",
    "pairwise_accuracy": "held-out pairwise accuracy",
    "rm_score": "held-out reward-model score",
    "kl": "KL to the reference (nats, last step)",
    "vlm_accuracy": "held-out answer accuracy, real image",
    "vlm_accuracy_blank_image": "held-out answer accuracy, black image",
}


def parameters(checkpoint: Path) -> int | None:
    """Parameter count from the safetensors headers (no weights are loaded)."""
    from safetensors import safe_open

    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with safe_open(str(f), "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


def environment() -> dict[str, Any]:
    import tokenizers
    import torch
    import transformers
    import trl

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {
        "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
        "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
        "tokenizers": tokenizers.__version__,
    }


def stage_metrics(out_dir: Path, stage: str, scalars: dict[str, list[tuple[int, float]]]) -> dict[str, dict]:
    """metrics.json, plus what the card derives: pretraining's perplexity (exp of the loss, with
    the unigram baseline's), PPO's KL at its last step (0 before: the policy starts as the reference)."""
    metrics = read_metrics(out_dir / stage)
    loss = metrics.get("eval_loss")
    if loss and loss.get("after") is not None:
        ppl = {"before": math.exp(min(loss["before"], 50)), "after": math.exp(min(loss["after"], 50)),
               "higher_is_better": False}
        if "baseline" in loss:
            ppl["baseline"] = math.exp(loss["baseline"])
        metrics["eval_perplexity"] = ppl
    if stage == "ppo" and scalars.get("train/kl"):
        metrics["kl"] = {"before": 0.0, "after": scalars["train/kl"][-1][1], "higher_is_better": False}
    return metrics


def collect(out_dir: Path, seconds: dict[str, float] | None = None) -> dict[str, Any]:
    """report.json's content for every stage that left something under `out_dir`; also draws the
    curves to `<out_dir>/plots/<stage>.png` (listed under "plot")."""
    seconds = seconds or {}
    stages: dict[str, dict] = {}
    for name in STAGES:
        sdir = out_dir / name
        if not (sdir / "metrics.json").is_file():
            continue
        output = stage_output(out_dir, name)
        seen = json.loads((sdir / SEEN_FILE).read_text()) if (sdir / SEEN_FILE).is_file() else {}
        scalars = read_scalars(sdir)
        plot = plot_stage(scalars, f"stage {name}", out_dir / "plots" / f"{name}.png")
        entry = {
            "seconds": seconds.get(name), "checkpoint": str(output) if output else None,
            "parameters": parameters(output) if output and name != "tokenizer" else None,
            "samples": seen.get("samples"), "tokens": seen.get("tokens"), "steps": seen.get("step"),
            "metrics": stage_metrics(out_dir, name, scalars),
            "plot": str(plot.relative_to(out_dir)) if plot else None,
        }
        if name == "tokenizer" and output:
            entry["vocab_size"] = len(json.loads((output / "tokenizer.json").read_text())["model"]["vocab"])
        stages[name] = entry
    return {"stages": stages, "environment": environment()}


def sample_chats(out_dir: Path, prompts: Sequence[str], max_new_tokens: int = 80) -> dict[str, list[tuple[str, str]]]:
    """Greedy replies of every chat stage's latest checkpoint to the same prompts."""
    from trainer.lib.generation import GREEDY, generate
    from trainer.lib.metrics import load_model

    chats = {}
    for stage in CHAT_STAGES:
        ckpt = stage_output(out_dir, stage)
        if ckpt is None or not prompts:
            continue
        lm, tokenizer = load_model(ckpt)
        replies = generate(lm, tokenizer, [[{"role": "user", "content": p}] for p in prompts], max_new_tokens, GREEDY).texts
        chats[stage] = list(zip(prompts, replies))
    return chats


def _value(m: dict, which: str) -> str:
    x = m.get(which)
    if x is None:
        return "n/a"
    if "n" in m:  # a share of n held-out items
        return f"{x:.1%} +- {m.get(f'{which}_stderr', 0.0):.1%}"
    return f"{x:.4g}"


def _count(x: int | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e4 else str(x)


def _minutes(s: float | None) -> str:
    return "-" if s is None else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def render_markdown(report: dict[str, Any], chats: dict[str, list[tuple[str, str]]]) -> str:
    stages, env = report["stages"], report["environment"]
    total = sum(s["seconds"] or 0 for s in stages.values())
    lines = ["# Report card", "",
             f"{len(stages)} stages, {_minutes(total)} of stage time on {env['cpu']} "
             f"({env['cpu_cores']} cores{', ' + env['gpu'] if env['gpu'] else ''}).", "",
             "## Stages", "",
             "| stage | time | parameters | trained on | held-out metric | before | after |",
             "|---|---|---|---|---|---|---|"]
    for name, s in stages.items():
        size = f"vocab {s['vocab_size']}" if name == "tokenizer" else _count(s["parameters"])
        seen = f"{_count(s['samples'])} samples" + (f", {_count(s['tokens'])} tokens" if s["tokens"] else "")
        for i, (metric, m) in enumerate(s["metrics"].items()):
            label = METRIC_NAMES.get(metric, metric)
            if "baseline" in m:
                label += f" (unigram baseline {m['baseline']:.4g})"
            better = "higher" if m["higher_is_better"] else "lower"
            head = [name, _minutes(s["seconds"]), size, seen] if i == 0 else ["", "", "", ""]
            lines.append("| " + " | ".join([*head, f"{label}, {better} is better", _value(m, "before"),
                                             f"**{_value(m, 'after')}**"]) + " |")
    lines += ["", "## Curves", ""]
    for name, s in stages.items():
        if s["plot"]:
            lines += [f"### {name}", "", f"![{name}]({s['plot']})", ""]
    if chats:
        lines += ["## Sample chats (greedy)", ""]
        for stage, pairs in chats.items():
            lines += [f"### {stage}", ""]
            lines += [f"- **{p}** -> {r.strip()}" for p, r in pairs]
            lines.append("")
    lines += ["## Environment", "", *(f"- {k}: {v}" for k, v in env.items()), ""]
    return "\n".join(lines)


def write_report(out_dir: Path, seconds: dict[str, float] | None = None,
                 chat_prompts: Sequence[str] = DEFAULT_CHAT_PROMPTS) -> tuple[Path, Path]:
    """<out_dir>/report.md and report.json (and plots/); returns their paths."""
    report = collect(out_dir, seconds)
    chats = sample_chats(out_dir, chat_prompts)
    report["chats"] = {stage: [{"prompt": p, "reply": r} for p, r in pairs] for stage, pairs in chats.items()}
    md, js = out_dir / "report.md", out_dir / "report.json"
    md.write_text(render_markdown(report, chats))
    js.write_text(json.dumps(report, indent=1) + "\n")
    return md, js
