"""Measure a checkpoint on one task and print ONE JSON line (easy to paste into a table or a log).

    python scripts/evaluate.py --stage pretrain --task ppl
    python scripts/evaluate.py --stage sft --task answer_acc --limit 200
    python scripts/evaluate.py --stage dpo --task pref_acc          # reference: the parent stage (sft)
    python scripts/evaluate.py --stage training/dpo/checkpoint-180 --task loglik_acc --data my_pairs.jsonl
    python scripts/evaluate.py --stage grpo --task math_acc                # greedy accuracy on RL prompts
    python scripts/evaluate.py --stage reward --task rm_acc                # reward model on held-out pairs
    python scripts/evaluate.py --stage ppo --task rm_score --reward_model reward
    python scripts/evaluate.py --stage vlm --task vlm_acc                  # VLM, real vs black image
    python scripts/evaluate.py --stage vlm --task vlm_acc --data ../shared/data/vlm_mnist.parquet

Tasks (trainer/lib/tasks.py, TASKS): ppl, answer_acc, pref_acc, loglik_acc; math_acc, rm_acc, rm_score (RL);
vlm_acc (VLM). Without --data a task reads the demo world's held-out file (generated into <out_dir>/demo_data/).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from trainer.lib.generation import REPLY_TOKENS
from trainer.lib.runtime import pick_precision, run_main, setup_logging
from trainer.lib.stages import StageError, resolve_model
from trainer.lib.tasks import TASKS, EvalRequest, evaluate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, help="stage name (latest checkpoint under --out_dir) or a model dir")
    p.add_argument("--task", required=True, choices=sorted(TASKS), help="what to measure")
    p.add_argument("--data", default=None, help="held-out jsonl (vlm_acc: parquet or jsonl); default: the demo "
                                                "file the task reads")
    p.add_argument("--image_dir", default=None, help="vlm_acc: folder a jsonl's image paths are relative to")
    p.add_argument("--limit", type=int, default=None, help="use at most N records")
    p.add_argument("--out_dir", default="training", help="root of the stages' outputs")
    p.add_argument("--ref", default=None, help="reference model for pref_acc (default: the stage's parent)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta of the implicit reward (pref_acc)")
    p.add_argument("--reward_model", default=None, help="rm_score: reward model stage or dir (default: reward)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=REPLY_TOKENS, help="reply length for generation tasks")
    p.add_argument("--max_length", type=int, default=256, help="tokens per document (ppl)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--examples", action="store_true", help="include a few graded replies in the output")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    setup_logging()
    out_dir = Path(args.out_dir)
    model_dir = resolve_model(args.stage, out_dir, "any", flag="--stage")
    if args.data:
        data = Path(args.data)
        if not data.is_file():
            raise StageError(f"--data {data}: no such file")
    else:
        from dataset.demo import write_demo_data
        from dataset.demo_vision import write_vlm_demo_data

        default = TASKS[args.task].default_data
        write = write_vlm_demo_data if default.startswith("vlm_") else write_demo_data
        data = write(out_dir / "demo_data")[default]
    req = EvalRequest(stage=args.stage, model_dir=model_dir, data=data, out_dir=out_dir, limit=args.limit,
                      ref=args.ref, device=pick_precision(args.device).device, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, max_length=args.max_length, beta=args.beta,
                      reward_model=args.reward_model, image_dir=Path(args.image_dir) if args.image_dir else None)
    result = evaluate(req, args.task)
    if not args.examples:
        result.pop("examples", None)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    run_main(main)
