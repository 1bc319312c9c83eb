"""Run the whole course, stage 0 to stage 7, then write the report card.

Each stage is the same script a learner runs by hand (`python trainer/train_N_x.py`), started as a
subprocess with `--out_dir` and the flags given here; nothing is reimplemented. After the last
stage, `<out_dir>/report.md` and `report.json` hold every stage's time, size, data seen and held-out
metric before -> after, sample chats and the curves (`<out_dir>/plots/<stage>.png`).

    python scripts/run_pipeline.py                            # every stage, tiny preset, embedded demo
    python scripts/run_pipeline.py --stages sft,dpo           # a subset (their parents must exist)
    python scripts/run_pipeline.py --resume                   # skip finished stages, resume the interrupted one
    python scripts/run_pipeline.py --config course.yaml       # per-stage flags, e.g. {sft: {epochs: 1}}
    python scripts/run_pipeline.py --preset small --seed 1    # passed to every stage that reads them
    python scripts/run_pipeline.py --report_only              # rebuild the report from what is on disk

`<out_dir>/pipeline.json` records each stage's status, command and seconds; `--resume` reads it.
A failing stage stops the run with that stage's own message and the command to rerun it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import yaml

from trainer.lib.report_card import DEFAULT_CHAT_PROMPTS, write_report
from trainer.lib.stages import REPO_ROOT, STAGES, latest_checkpoint, stage_output

STATE_FILE = "pipeline.json"
# Seconds each stage took with its defaults on the 2-core CPU: the first guess of the time left,
# corrected as the run goes by how much faster or slower this machine is.
EXPECTED_SECONDS = {"tokenizer": 10, "pretrain": 270, "sft": 700, "dpo": 240, "grpo": 560, "reward": 460,
                    "ppo": 600, "vlm": 340}
PASSED_TO_ALL = ("seed",)  # a pipeline flag every stage with that flag receives


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="training", help="root of every stage's output (default: training)")
    p.add_argument("--stages", default=",".join(STAGES),
                   help=f"comma-separated stages to run, in course order (default: all: {','.join(STAGES)})")
    p.add_argument("--resume", action="store_true",
                   help="skip stages that finished; resume the interrupted one from its latest checkpoint")
    p.add_argument("--config", help="YAML mapping stage -> {flag: value} (e.g. sft: {epochs: 1}); "
                                    "the key 'all' applies to every stage that has the flag")
    p.add_argument("--preset", help="model size preset for pretraining (tiny, small, base, moe, tiny-moe)")
    p.add_argument("--seed", type=int, help="random seed for every stage that has one")
    p.add_argument("--report_only", action="store_true", help="run nothing; rebuild the report from out_dir")
    p.add_argument("--chat_prompts", default="|".join(DEFAULT_CHAT_PROMPTS),
                   help="'|'-separated prompts every chat stage answers in the report")
    args = p.parse_args(argv)
    wanted = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in STAGES]
    if unknown or not wanted:
        p.error(f"--stages: unknown stage(s) {', '.join(unknown) or '(none given)'}; the stages are: {', '.join(STAGES)}")
    args.stage_list = [s for s in STAGES if s in wanted]
    args.stage_flags = read_config(p, args.config)
    return args


def read_config(p: argparse.ArgumentParser, path: str | None) -> dict[str, dict]:
    if not path:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        p.error(f"--config {path}: no such file")
    except yaml.YAMLError as e:
        p.error(f"--config {path}: not valid YAML ({e})")
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        p.error(f"--config {path}: expected a mapping of stage -> {{flag: value}}")
    unknown = [k for k in data if k not in STAGES and k != "all"]
    if unknown:
        p.error(f"--config {path}: unknown stage(s) {', '.join(unknown)}; the stages are: {', '.join(STAGES)} (or all)")
    return data


def stage_flags_of(script: str) -> set[str]:
    """The flags a stage script accepts, from its --help."""
    out = subprocess.run([sys.executable, script, "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True).stdout
    return {w.split("=")[0].strip("[],") for w in out.split() if w.startswith("--")}


def as_cli(flags: dict) -> list[str]:
    """{flag: value} -> ["--flag", "value"]; true booleans are bare flags, false ones are left out."""
    cli = []
    for key, value in flags.items():
        if value is True:
            cli.append(f"--{key}")
        elif value is not False and value is not None:
            cli += [f"--{key}", str(value)]
    return cli


def command(args: argparse.Namespace, stage: str, resume: bool) -> list[str]:
    script = STAGES[stage].script
    shared = {**args.stage_flags.get("all", {}), **{k: getattr(args, k) for k in PASSED_TO_ALL if getattr(args, k) is not None}}
    accepted = stage_flags_of(script) if shared else set()  # (a --help costs seconds: only when needed)
    flags = {k: v for k, v in shared.items() if f"--{k}" in accepted}
    if args.preset and stage == "pretrain":
        flags["preset"] = args.preset
    flags.update(args.stage_flags.get(stage, {}))  # a stage's own section wins
    if resume:
        flags["resume"] = True
    return [sys.executable, script, "--out_dir", args.out_dir, *as_cli(flags)]


def run_streamed(cmd: list[str]) -> tuple[int, list[str]]:
    """Run `cmd`, passing its output (progress bars included) straight through; returns the exit
    code and its last lines, which a failure repeats."""
    tail: deque[str] = deque(maxlen=15)
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    partial = b""
    while chunk := os.read(proc.stdout.fileno(), 4096):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        *lines, partial = (partial + chunk).replace(b"\r", b"\n").split(b"\n")
        tail.extend(line.decode(errors="replace") for line in lines if line.strip())
    if partial.strip():
        tail.append(partial.decode(errors="replace"))
    return proc.wait(), list(tail)


def load_state(out_dir: Path) -> dict:
    path = out_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {"stages": {}}


def save_state(out_dir: Path, state: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(out_dir / STATE_FILE)  # never a half-written state file


def time_left(todo: list[str], done: dict[str, float]) -> float:
    """Expected seconds for `todo`, scaled by how this machine compares with the expectation so far."""
    speed = sum(done.values()) / sum(EXPECTED_SECONDS[s] for s in done) if done else 1.0
    return speed * sum(EXPECTED_SECONDS[s] for s in todo)


def fmt(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m}:{s:02d}"


def plan(stages: list[str], state: dict, out_dir: Path, resume: bool) -> list[tuple[str, str]]:
    """(stage, what to do) for each stage: "skip" (finished earlier, --resume), "resume" (interrupted
    after a checkpoint, --resume), or "run"."""
    steps = []
    for stage in stages:
        entry = state["stages"].get(stage, {})
        if resume and entry.get("status") == "done" and stage_output(out_dir, stage) is not None:
            steps.append((stage, "skip"))
        elif resume and stage != "tokenizer" and latest_checkpoint(out_dir / stage) is not None:
            steps.append((stage, "resume"))  # an interrupted stage continues from its latest checkpoint
        else:
            steps.append((stage, "run"))
    return steps


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    state = load_state(out_dir)
    if not args.report_only:
        todo = list(args.stage_list)
        timed: dict[str, float] = {}
        start = time.time()
        for i, (stage, action) in enumerate(plan(args.stage_list, state, out_dir, args.resume), 1):
            entry = state["stages"].get(stage, {})
            if action == "skip":
                print(f"[{i}/{len(args.stage_list)}] {stage}: finished earlier ({fmt(entry['seconds'])}), skipped", flush=True)
                todo.remove(stage)
                continue
            resume = action == "resume"
            cmd = command(args, stage, resume)
            shown = " ".join(["python", *cmd[1:]])
            print(f"\n[{i}/{len(args.stage_list)}] {stage}: {shown}\n    elapsed {fmt(time.time() - start)}, "
                  f"about {fmt(time_left(todo, timed))} left", flush=True)
            state["stages"][stage] = {"status": "running", "command": shown, "started": time.time()}
            save_state(out_dir, state)
            t0 = time.time()
            code, tail = run_streamed(cmd)
            seconds = time.time() - t0 + (entry.get("seconds", 0.0) if resume else 0.0)
            state["stages"][stage].update(status="done" if code == 0 else "failed", returncode=code, seconds=seconds)
            save_state(out_dir, state)
            if code != 0:
                last = "\n    ".join(tail[-5:])
                print(f"\nstage {stage} failed (exit code {code}). Its last lines:\n    {last}\n"
                      f"Rerun it alone with: {shown}\n"
                      f"or continue the course from there with: python scripts/run_pipeline.py --resume"
                      f"{'' if args.out_dir == 'training' else ' --out_dir ' + args.out_dir}", file=sys.stderr)
                return code
            todo.remove(stage)
            timed[stage] = time.time() - t0
        print(f"\nall {len(args.stage_list)} stages done in {fmt(time.time() - start)}", flush=True)
    seconds = {s: e["seconds"] for s, e in state["stages"].items() if e.get("status") == "done"}
    md, js = write_report(out_dir, seconds, [p for p in args.chat_prompts.split("|") if p.strip()])
    print(f"report card: {md} (and {js.name}, plots/); curves: tensorboard --logdir {out_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
