"""Training curves: every stage's TensorBoard scalars read back from its event files and drawn to PNG.

`read_scalars(stage_dir)` -> {tag: [(step, value), ...]} over every event file under the stage dir
(a stage that writes several runs, such as the VLM's align/ phase, gets its tags prefixed
"align/"); `plot_stage(scalars, title, path)` draws one figure with a panel per kind of curve
that the stage logged: loss, learning rate, reward, KL, accuracy.
"""

from __future__ import annotations

import re
from pathlib import Path

PANELS: dict[str, re.Pattern] = {
    "loss": re.compile(r"(^|/)(train|eval)/(loss|policy_loss|value_loss)$"),
    "learning rate": re.compile(r"(^|/)train/(learning_rate|lr)$"),
    "reward": re.compile(r"(^|/)train/(reward|rewards/[a-z_]+|reward_model_score|rewards/margins)(/mean)?$"),
    "KL": re.compile(r"(^|/)train/(kl|objective/kl)$"),
    "accuracy": re.compile(r"accuracy"),
}
SKIP = re.compile(r"mean_token_accuracy|_std$|/std$")
MAX_LINES = 5  # per panel: more lines stop being readable


def read_scalars(stage_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar under `stage_dir` (its runs/ and sub-phases' runs/), sorted by step; a step
    logged twice (a resumed run) keeps the later value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    merged: dict[str, dict[int, tuple[float, float]]] = {}
    for events in sorted(stage_dir.rglob("events.out.tfevents.*")):
        rel = events.parent.relative_to(stage_dir).parts
        prefix = "/".join(p for p in rel if p != "runs")
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            name = f"{prefix}/{tag}" if prefix else tag
            for e in acc.Scalars(tag):
                old = merged.setdefault(name, {}).get(e.step)
                if old is None or e.wall_time >= old[0]:
                    merged[name][e.step] = (e.wall_time, e.value)
    return {tag: sorted((s, v) for s, (_, v) in by_step.items()) for tag, by_step in merged.items()}


def panels(scalars: dict[str, list[tuple[int, float]]]) -> dict[str, list[str]]:
    """Which tags go into which panel (only panels with data, at most MAX_LINES tags each)."""
    out: dict[str, list[str]] = {}
    for panel, pattern in PANELS.items():
        tags = [t for t in sorted(scalars) if pattern.search(t) and not SKIP.search(t)]
        if tags:
            out[panel] = tags[:MAX_LINES]
    return out


def plot_grid(cells: list[tuple[str, dict[str, list[tuple[int, float]]]]], path: Path, cols: int,
              title: str | None = None) -> Path:
    """One PNG of panels, `cols` to a row: each cell is (panel title, {tag: [(step, value), ...]})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(cells) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 if rows == 1 else 3 * rows), squeeze=False)
    for ax in axes.flat[len(cells):]:
        ax.axis("off")
    for ax, (name, curves) in zip(axes.flat, cells):
        for tag, points in curves.items():
            steps, values = zip(*points)
            # A held-out metric is measured at the start and the end only: markers, not a line.
            style = dict(marker="o", linestyle="--") if len(steps) <= 3 else {}
            ax.plot(steps, values, label=tag, **style)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_stage(scalars: dict[str, list[tuple[int, float]]], title: str, path: Path) -> Path | None:
    """One PNG for one stage, a panel per kind of curve; None when the stage logged no curves."""
    chosen = panels(scalars)
    if not chosen:
        return None
    return plot_grid([(panel, {t: scalars[t] for t in tags}) for panel, tags in chosen.items()], path,
                     cols=len(chosen), title=title)

# The one curve per stage that the course overview shows (panel of `panels`, preferred tags first).
HEADLINE = {
    "pretrain": ("loss", ("eval/loss", "train/loss")),
    "sft": ("loss", ("eval/loss", "train/loss")),
    "dpo": ("reward", ("train/rewards/margins",)),
    "grpo": ("reward", ("train/reward",)),
    "reward": ("accuracy", ("eval/pairwise_accuracy", "train/accuracy")),
    "ppo": ("reward", ("train/reward_model_score",)),
    "vlm": ("loss", ("align/train/loss", "train/loss")),  # phase 1, then phase 2
}


def plot_course(out_dir: Path, path: Path) -> Path | None:
    """One figure for the whole course: each stage's headline curve (HEADLINE) from `<out_dir>/<stage>/`."""
    found = []
    for stage, (panel, tags) in HEADLINE.items():
        scalars = read_scalars(out_dir / stage) if (out_dir / stage).is_dir() else {}
        chosen = [t for t in tags if scalars.get(t)] or panels(scalars).get(panel, [])
        if chosen:
            found.append((f"{stage}: {panel}", {t: scalars[t] for t in chosen}))
    return plot_grid(found, path, cols=4) if found else None
