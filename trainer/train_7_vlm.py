"""Stage 7: a vision-language model (MiniMind-V): the SFT model learns to see through a small ViT.

An image becomes N patch features (the ViT), each projected to the LM's width (the projector) and
spliced in place of one of N `<image>` tokens in the prompt (model/vlm.py). Two phases:

    phase 1, align     captions; the LM is frozen, the ViT and projector learn to produce embeddings
                       the frozen LM can describe (saved to <out_dir>/vlm/align/)
    phase 2, instruct  visual questions; the LM learns too (all of it, or --lm_layers N last blocks)
                       (saved to <out_dir>/vlm/, the stage's output)

The loss is next-token cross-entropy on the assistant tokens only; image tokens and the prompt are
-100. Held-out accuracy (greedy, exact one-word answers) is measured before and after phase 2, with
each real image and with a black image: the gap is what the model reads from the picture.

    python trainer/train_7_vlm.py                          # both phases on the demo scenes
    python trainer/train_7_vlm.py --phase 2                # instruct only, from <out_dir>/vlm/align/ if present
    python trainer/train_7_vlm.py --data ../shared/data/vlm_mnist.parquet    # MiniMind-V parquet (both phases)
    python trainer/train_7_vlm.py --data vlm.jsonl --image_dir images/       # jsonl + image folder
    python trainer/train_7_vlm.py --vision_tower path/to/siglip              # a pretrained tower, frozen
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loguru import logger
from transformers import (AutoConfig, AutoModelForImageTextToText, AutoTokenizer, Trainer, TrainerCallback,
                          TrainingArguments)

import model as mm  # noqa: F401  (registers MiniMind and the VLM with the Auto classes)
from dataset.demo_vision import write_vlm_demo_data
from dataset.images import load_image_processor
from dataset.jsonl import DataError
from dataset.vlm import load_vlm_records
from model import VisionConfig
from trainer.lib.callbacks import attach_callbacks
from trainer.lib.flags import (CheckpointFlags, DataFlags, HardwareFlags, InitFlags, RunFlags, ScheduleFlags,
                               TrainerFlags, flag, parse_args)
from trainer.lib.metrics import vlm_accuracy
from trainer.lib.report import StageReport, trainer_seen
from trainer.lib.runtime import StageRun, run_main, start_stage, trainer_kwargs
from trainer.lib.stages import StageError, latest_checkpoint, resolve_init, rewriting, unmarked_note
from trainer.lib.vlm_batches import VLMCollator, VLMDataset
from trainer.lib.vlm_model import build_vlm, set_trainable, trainable_table

PHASES = ("both", "1", "2")


@dataclass
class VLMArgs(RunFlags, DataFlags, InitFlags, ScheduleFlags, CheckpointFlags, HardwareFlags, TrainerFlags):
    data: str | None = flag(None, "phase 2 (visual Q&A) parquet or jsonl in MiniMind-V's format; default: "
                                  "the demo scenes")
    eval_data: str | None = flag(None, "held-out parquet/jsonl; default: the demo's eval split, or every "
                                       "20th record of --data")
    align_data: str | None = flag(None, "phase 1 (captions) file; default: --data if given, else the demo captions")
    image_dir: str | None = flag(None, "folder the jsonl 'image' paths are relative to (default: the jsonl's folder)")
    phase: str = flag("both", "which phases to run: both, 1 (align) or 2 (instruct)", choices=PHASES)
    vision_tower: str | None = flag(None, "a transformers SigLIP/CLIP vision model dir to use instead of the "
                                          "built-in ViT (frozen unless --train_tower)")
    train_tower: bool = flag(False, "also train a --vision_tower (the built-in ViT always trains)")
    image_size: int = flag(48, "built-in ViT: input size in pixels (images are resized to it)")
    # 24 = one patch per cell of the demo's 2x2 grid: 4 image tokens, each a whole object. With 8
    # (36 tokens, 3x3 per cell) held-out accuracy was lower (45.5% vs 54.5%) and the stage 2x slower.
    patch_size: int = flag(24, "built-in ViT: patch side; (image_size / patch_size)^2 image tokens per image")
    vision_hidden_size: int = flag(128, "built-in ViT: width")
    vision_layers: int = flag(2, "built-in ViT: blocks")
    vision_heads: int = flag(4, "built-in ViT: attention heads")
    lm_layers: int = flag(-1, "phase 2: train the LM's last N blocks only (-1 = the whole LM, 0 = keep it frozen)")
    # Above ~1e-3 the fresh ViT collapses to one image-independent embedding within the first steps
    # (the LM learns to ignore it: same accuracy with a black image); 5e-4 keeps it informative.
    align_lr: float = flag(5e-4, "phase 1 peak learning rate")
    lr: float = flag(5e-4, "phase 2 peak learning rate")
    align_epochs: float = flag(1.0, "phase 1 passes over the captions")
    epochs: float = flag(3.0, "phase 2 passes over the questions")
    batch_size: int = flag(32, "samples per micro-batch")
    logging_steps: int = flag(20, "log the loss every N steps")
    eval_steps: int = flag(0, "held-out loss every N steps (0 = only at the end of each phase)")
    save_steps: int = flag(1000, "save a checkpoint every N steps (and always at the end)")
    eval_answers: int = flag(200, "held-out questions answered greedily before and after phase 2")
    max_eval_records: int = flag(400, "held-out records at most")


def phase_files(args: VLMArgs, out_dir: Path) -> dict[str, tuple[Path, Path | None]]:
    """{"1": (train, eval), "2": (train, eval)}: the user's files, or the generated demo scenes."""
    if args.data:
        data = Path(args.data)
        align = Path(args.align_data) if args.align_data else data
        evals = Path(args.eval_data) if args.eval_data else None
        for p in (data, align, evals):
            if p is not None and not p.is_file():
                raise StageError(f"{p}: no such file")
        return {"1": (align, None), "2": (data, evals)}
    demo = write_vlm_demo_data(out_dir / "demo_data")
    logger.info(f"no --data: using the generated demo scenes in {out_dir / 'demo_data'}")
    align = Path(args.align_data) if args.align_data else demo["vlm_caption_train"]
    return {"1": (align, demo["vlm_caption_eval"] if not args.align_data else None),
            "2": (demo["vlm_qa_train"], demo["vlm_qa_eval"])}


def load_split(args: VLMArgs, train: Path, evals: Path | None) -> tuple[list[dict], list[dict]]:
    """Records of both files, or every 20th training record held out (a stride, not the tail, so a
    file sorted by label, like the MNIST one, still gives a held-out part with every label)."""
    try:
        rows = load_vlm_records(train, args.image_dir, args.skip_bad_lines)
        if evals is not None:
            return rows, load_vlm_records(evals, args.image_dir, args.skip_bad_lines)[: args.max_eval_records]
    except DataError as e:
        raise StageError(str(e)) from e
    held = set(range(0, len(rows), 20)[: args.max_eval_records])
    logger.info(f"no held-out file: every 20th record of {train} is held out ({len(held)})")
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def train_phase(args: VLMArgs, run: StageRun, phase: str, vlm, tokenizer, processor, train_rows, eval_rows,
                resume: Path | None = None, callbacks: Sequence[TrainerCallback] = ()) -> Trainer:
    sizes = {"1": (args.align_lr, args.align_epochs), "2": (args.lr, args.epochs)}[phase]
    set_trainable(vlm, int(phase), args.lm_layers, args.train_tower or None)
    logger.info(f"phase {phase} ({'align: captions' if phase == '1' else 'instruct: questions'}), "
                f"{len(train_rows):,} samples; {trainable_table(vlm)}")
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.dir / "runs")
    phase_args = dataclasses.replace(args, lr=sizes[0], epochs=sizes[1])
    config = TrainingArguments(**trainer_kwargs(phase_args, run, has_eval=bool(eval_rows) and args.eval_steps > 0,
                                                remove_unused_columns=False, include_num_input_tokens_seen=False))
    n_tokens = vlm.config.image_seq_length
    image_id = vlm.config.image_token_id
    trainer = Trainer(model=vlm, args=config, processing_class=tokenizer,
                      train_dataset=VLMDataset(train_rows, tokenizer, image_id, n_tokens),
                      eval_dataset=VLMDataset(eval_rows, tokenizer, image_id, n_tokens) if eval_rows else None,
                      data_collator=VLMCollator(processor, tokenizer.pad_token_id), callbacks=list(callbacks))
    attach_callbacks(trainer, perplexity=False)
    trainer.train(resume_from_checkpoint=resume)  # weights, optimizer, scheduler, RNG and data position
    if eval_rows:
        loss = trainer.evaluate()["eval_loss"]
        logger.info(f"phase {phase}: held-out loss {loss:.3f} on {len(eval_rows)} records")
    final = run.dir / f"checkpoint-{trainer.state.global_step}"
    final.mkdir(parents=True, exist_ok=True)
    with rewriting(final):
        trainer.save_model(str(final))
        processor.save_pretrained(final)  # the pixels this model was trained on travel with it
    logger.info(f"phase {phase}: saved {final}")
    return trainer


def phase_done(ckpt: Path) -> bool:
    """A Trainer checkpoint saved at its phase's last step (trainer_state.json: global_step = max_steps)."""
    state = ckpt / "trainer_state.json"
    if not state.is_file():
        return True  # only the final save_model() writes a checkpoint without it
    saved = json.loads(state.read_text())
    return saved["global_step"] >= saved["max_steps"]


def resume_plan(phases: tuple[str, ...], align_dir: Path, instruct_dir: Path) -> tuple[tuple[str, ...], dict]:
    """--resume: the phases still to run and {phase: checkpoint it continues from}. A phase 2
    checkpoint means phase 1 is done; a finished phase 1 is skipped; an interrupted one continues."""
    instruct = latest_checkpoint(instruct_dir) if "2" in phases else None
    if instruct is not None:
        return ("2",), {"2": instruct}
    aligned = latest_checkpoint(align_dir) if "1" in phases else None
    if aligned is None:
        raise StageError(f"--resume: no checkpoint in {instruct_dir} or {align_dir} to resume from"
                         f"{unmarked_note(instruct_dir)}{unmarked_note(align_dir)}; run without --resume first")
    if phase_done(aligned) and phases != ("1",):
        return ("2",), {}
    return phases, {"1": aligned}


def main(argv: Sequence[str] | None = None, callbacks: Sequence[TrainerCallback] = ()) -> Path:
    args = parse_args(VLMArgs, argv, __doc__)
    run = start_stage("vlm", args)
    files = phase_files(args, run.out_dir)
    align_run = dataclasses.replace(run, dir=run.dir / "align")
    phases = ("1", "2") if args.phase == "both" else (args.phase,)
    resume_from: dict[str, Path] = {}
    if args.resume:
        phases, resume_from = resume_plan(phases, align_run.dir, run.dir)
        logger.info(f"--resume: phase{'s' if len(phases) > 1 else ''} {' and '.join(phases)} to run"
                    + "".join(f"; phase {k} continues {v}" for k, v in resume_from.items()))

    # Phase 2 alone continues phase 1's model; otherwise the VLM is assembled from the SFT checkpoint.
    aligned = latest_checkpoint(align_run.dir) if phases[0] == "2" and not args.init_from else None
    if phases[0] == "2" and not args.init_from and aligned is None:
        raise StageError(f"--phase 2 continues phase 1, but {align_run.dir} has no aligned model. Create it with: "
                         f"python trainer/train_7_vlm.py --phase 1 --out_dir {args.out_dir} "
                         f"(or skip alignment: --init_from sft)")
    init = aligned or resolve_init("vlm", args.out_dir, args.init_from)
    tokenizer = AutoTokenizer.from_pretrained(init)
    if AutoConfig.from_pretrained(init).model_type == "minimind_vlm":
        vlm = AutoModelForImageTextToText.from_pretrained(init)
        processor = load_image_processor(init, vlm.config.vision_config.image_size)
        logger.info(f"continuing the VLM in {init}")
    else:
        if phases[0] == "2":
            logger.warning("phase 2 without phase 1 (--init_from names an LM): the projector starts untrained")
        tower = Path(args.vision_tower) if args.vision_tower else None
        if tower is not None and not tower.is_dir():
            raise StageError(f"--vision_tower {tower}: no such directory")
        vision = VisionConfig(image_size=args.image_size, patch_size=args.patch_size, hidden_size=args.vision_hidden_size,
                              intermediate_size=4 * args.vision_hidden_size, num_hidden_layers=args.vision_layers,
                              num_attention_heads=args.vision_heads)
        vlm = build_vlm(init, tokenizer, vision, tower)
        processor = load_image_processor(tower or init, vlm.config.vision_config.image_size)
    vlm = vlm.to(run.precision.device)

    report, samples = None, 0
    for phase in phases:
        phase_run = align_run if phase == "1" else run
        train_rows, eval_rows = load_split(args, *files[phase])
        if phase == "2" and args.eval_answers:
            questions = eval_rows[: args.eval_answers]

            def accuracy(blank: bool) -> float:
                acc = vlm_accuracy(vlm, tokenizer, processor, questions, blank=blank)
                kinds = ", ".join(f"{k} {v['accuracy']:.0%}" for k, v in acc["by_kind"].items())
                logger.info(f"held-out answers ({'black image' if blank else 'real image'}, {acc['n']} questions): "
                            f"{acc['accuracy']:.1%} +- {acc['stderr']:.1%}; by kind: {kinds}")
                return acc["accuracy"]

            report = StageReport(run, resume=args.resume)
            report.before("vlm_accuracy", lambda: accuracy(False), higher_is_better=True, n=len(questions))
            report.before("vlm_accuracy_blank_image", lambda: accuracy(True), higher_is_better=False, n=len(questions))
        trainer = train_phase(args, phase_run, phase, vlm, tokenizer, processor, train_rows, eval_rows,
                              resume_from.get(phase), callbacks)
        samples += trainer_seen(trainer)["samples"]  # both phases' records
    if report is not None:
        report.after("vlm_accuracy", accuracy(False))
        report.after("vlm_accuracy_blank_image", accuracy(True))
        report.save(trainer.state.global_step, samples=samples)
    out = latest_checkpoint(run.dir if phases[-1] == "2" else align_run.dir)
    logger.info(f"saved {out}; chat with it: python scripts/test_chat.py --stage vlm --image PATH")
    return out


if __name__ == "__main__":
    run_main(main)
