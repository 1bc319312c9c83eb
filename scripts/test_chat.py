"""Talk to the latest checkpoint of any stage, watching the reply appear token by token.

    python scripts/test_chat.py --stage pretrain                       # plain continuation of your text
    python scripts/test_chat.py --stage sft                            # chat, history kept; /reset clears it
    python scripts/test_chat.py --stage dpo --temperature 0.7 --top_p 0.9
    python scripts/test_chat.py --stage sft --prompt "What is 23 + 45?" --prompt "And minus 5?"
    python scripts/test_chat.py --stage training/sft/checkpoint-500 --system "You are a careful math tutor."
    python scripts/test_chat.py --stage vlm --image scene.png --prompt "What colour is the circle?"

A pretrained model only knows how to continue text, so `--stage pretrain` feeds your words as they
are. Chat stages (sft, dpo, grpo, ppo...) were trained on the chat template, so every turn is
rendered with it (`<|im_start|>user ... <|im_end|>` then `<|im_start|>assistant`), the whole
conversation so far included: that is how the model "remembers" earlier turns.
A VLM (`--stage vlm`) reads `--image`: the first user turn gets `<image>` put in front of it (unless
you typed one), and the image's patches stand in for it in every later turn too.
`--temperature 0` decodes greedily (always the most likely token); above 0 it samples, after
`--top_k` / `--top_p` cut the unlikely tail and `--repetition_penalty` damps tokens already seen.
`--show_probs` prints, after each reply, every token with the probability the model gave it and
its top alternatives (coloured by probability on a terminal): where sampling took a token greedy
decoding would not have (rank > 0), and where the model was unsure.

    python scripts/test_chat.py --stage sft --show_probs --prompt "What is 47 + 25?"
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from threading import Thread

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer, TextIteratorStreamer

import model as _registers_minimind  # noqa: F401  (Auto classes learn model_type "minimind")
from dataset.chat_template import IMAGE
from dataset.images import decode_image, load_image_processor
from trainer.lib.generation import Generation, Prompt, Sampling, TokenChoice, generate, token_choices
from trainer.lib.runtime import pick_precision, run_main, setup_logging
from trainer.lib.stages import STAGES, StageError, creating_command, resolve_model, stage_output


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="sft", help="stage name (its latest checkpoint under --out_dir) or a model dir")
    p.add_argument("--out_dir", default="training", help="root of the stages' outputs")
    p.add_argument("--mode", default="auto", choices=("auto", "chat", "plain"),
                   help="plain = continue the text; chat = chat template with history (auto: plain for pretrain)")
    p.add_argument("--prompt", action="append", default=None,
                   help="say this and exit instead of reading stdin; repeat for a multi-turn conversation")
    p.add_argument("--system", default=None, help="system message put before the conversation (chat mode)")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy decoding")
    p.add_argument("--top_p", type=float, default=0.9, help="sample from the smallest set of tokens holding this mass")
    p.add_argument("--top_k", type=int, default=0, help="sample from the k most likely tokens only (0 = off)")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="> 1 makes already-seen tokens less likely")
    p.add_argument("--seed", type=int, default=None, help="seed the sampler (reproducible replies)")
    p.add_argument("--image", default=None, help="VLM stages: the image (png/jpg...) the conversation is about")
    p.add_argument("--show_probs", action="store_true",
                   help="after each reply, show each token's probability and its --top_alternatives")
    p.add_argument("--top_alternatives", type=int, default=3, help="alternatives shown per token with --show_probs")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return p


def resolve_model_dir(stage: str, out_dir: Path) -> Path:
    """`--stage` -> a model dir; a missing stage names the command that creates it."""
    if stage == "tokenizer":
        raise StageError("--stage tokenizer: the tokenizer stage has no model; chat with pretrain or a later stage")
    if stage in STAGES and stage_output(out_dir, stage) is None:
        raise StageError(f"--stage {stage}: no checkpoint under {out_dir / stage}. "
                         f"Create it with: {creating_command(stage, out_dir)}")
    return resolve_model(stage, out_dir, flag="--stage")


def load(model_dir: Path, device: str = "auto"):
    """(model, tokenizer, image processor or None): a VLM checkpoint loads as one, with its processor."""
    precision = pick_precision(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    is_vlm = AutoConfig.from_pretrained(model_dir).model_type == "minimind_vlm"
    auto = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    model = auto.from_pretrained(model_dir, dtype=precision.dtype).to(precision.device).eval()
    processor = load_image_processor(model_dir, model.config.vision_config.image_size) if is_vlm else None
    return model, tokenizer, processor


def sampling_of(args: argparse.Namespace) -> Sampling:
    return Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    repetition_penalty=args.repetition_penalty)


class Chat:
    """A conversation: the history of messages (chat mode) and how one turn becomes model input."""

    def __init__(self, model, tokenizer, chat: bool, system: str | None, sampling: Sampling,
                 max_new_tokens: int = 128, image=None, image_processor=None, **generate_kwargs):
        self.model, self.tokenizer, self.chat, self.system = model, tokenizer, chat, system
        self.sampling, self.max_new_tokens, self.generate_kwargs = sampling, max_new_tokens, generate_kwargs
        self.image, self.image_processor = image, image_processor
        self.last: Generation | None = None  # the latest reply's tokens (--show_probs reads them)
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt(self, text: str) -> Prompt:
        """The model input for a new user turn: the whole conversation so far (chat) or the text (plain)."""
        if not self.chat:
            return text
        if self.image is not None and not any(m["role"] == "user" for m in self.messages) and IMAGE not in text:
            text = f"{IMAGE}\n{text}"  # the image comes first, as in MiniMind-V's data
        self.messages.append({"role": "user", "content": text})
        return list(self.messages)

    def turn(self, text: str, write: Callable[[str], None]) -> str:
        """Generate in a thread and hand each decoded piece to `write` as soon as it exists; returns
        the reply decoded from the generated ids in one go (the pieces joined equal it)."""
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        prompt, result = self.prompt(text), {}

        vision = {}
        if self.image is not None:
            n = sum(m["content"].count(IMAGE) for m in prompt if m["role"] == "user") if self.chat else 0
            vision = {"images": [[self.image] * n], "image_processor": self.image_processor}

        def work() -> None:
            result["generation"] = generate(self.model, self.tokenizer, [prompt], self.max_new_tokens, self.sampling,
                                            streamer=streamer, **vision, **self.generate_kwargs)
            result["reply"] = result["generation"].texts[0]

        thread = Thread(target=work)
        thread.start()
        for piece in streamer:
            write(piece)
        thread.join()
        if "reply" not in result:
            raise RuntimeError("generation failed (see the error above)")
        if self.chat:
            self.messages.append({"role": "assistant", "content": result["reply"]})
        self.last = result["generation"]
        return result["reply"]


def _write(piece: str) -> None:
    print(piece, end="", flush=True)


def _colour(prob: float, text: str, tty: bool) -> str:
    """Green: the model was sure (>= 0.9); yellow: fairly (>= 0.5); red: unsure."""
    if not tty:
        return text
    code = 32 if prob >= 0.9 else 33 if prob >= 0.5 else 31
    return f"\033[{code}m{text}\033[0m"


def format_choices(choices: Sequence[TokenChoice], tty: bool = False) -> str:
    """One line per token: its text, probability, rank (0 = greedy's pick) and the alternatives."""
    lines = ["  token              p     rank  alternatives"]
    for c in choices:
        alts = ", ".join(f"{t!r} {p:.2f}" for t, p in c.top if t != c.text)
        mark = "*" if c.rank > 0 else " "  # sampling took a token greedy decoding would not have
        lines.append(f"  {_colour(c.prob, f'{c.text!r:<16}', tty)} {c.prob:5.2f} {mark}{c.rank:<4} {alts}")
    sure = sum(c.prob >= 0.9 for c in choices)
    lines.append(f"  {len(choices)} tokens, {sure} with p >= 0.9, {sum(c.rank > 0 for c in choices)} not the most "
                 f"likely (*: sampled where greedy would differ)")
    return "\n".join(lines)


def converse(chat: Chat, prompts: Iterable[str], interactive: bool, show_probs: bool = False,
             top_alternatives: int = 3) -> list[tuple[str, str]]:
    """Run the turns; `/reset` clears the history, `exit` (or end of input) stops."""
    turns = []
    who = "assistant" if chat.chat else "model"
    for text in prompts:
        text = text.strip()
        if text in ("exit", "quit"):
            break
        if not text:
            continue
        if text == "/reset":
            chat.reset()
            print("(history cleared)", flush=True)
            continue
        if not interactive:
            print(f"user: {text}", flush=True)
        print(f"{who}: " + ("" if chat.chat else text), end="", flush=True)
        reply = chat.turn(text, _write)
        print(flush=True)
        if show_probs:
            print(format_choices(token_choices(chat.model, chat.tokenizer, chat.last, k=top_alternatives),
                                 tty=sys.stdout.isatty()), flush=True)
        turns.append((text, reply))
    return turns


def _stdin_lines() -> Iterable[str]:
    while True:
        try:
            yield input("you: " if sys.stdin.isatty() else "")
        except EOFError:
            return


def main(argv: Sequence[str] | None = None) -> list[tuple[str, str]]:
    args = build_parser().parse_args(argv)
    setup_logging()
    out_dir = Path(args.out_dir)
    model_dir = resolve_model_dir(args.stage, out_dir)
    plain = args.mode == "plain" or (args.mode == "auto" and (
        args.stage == "pretrain" or model_dir.parent.name == "pretrain"))
    model, tokenizer, processor = load(model_dir, args.device)
    if not plain and not tokenizer.chat_template:
        raise StageError(f"{model_dir}: the tokenizer has no chat template; use --mode plain")
    image = None
    if args.image:
        if processor is None:
            raise StageError(f"--image: {model_dir} is a language model, not a VLM; chat about images with "
                             f"--stage vlm (python trainer/train_7_vlm.py trains it)")
        try:
            image = decode_image(Path(args.image))
        except (OSError, ValueError) as e:
            raise StageError(f"--image {args.image}: not a readable image ({e})") from e
    elif processor is not None:
        raise StageError(f"{model_dir} is a VLM: pass --image PATH (the picture to talk about)")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    chat = Chat(model, tokenizer, chat=not plain, system=args.system, sampling=sampling_of(args),
                max_new_tokens=args.max_new_tokens, image=image, image_processor=processor)
    mode = "plain continuation" if plain else "chat"
    print(f"[{model_dir}: {mode}; " + ("" if args.prompt else "/reset clears the history, exit or Ctrl-D quits; ")
          + f"temperature {args.temperature}]", flush=True)
    if args.show_probs and processor is not None:
        raise StageError("--show_probs reads a language model's probabilities; it does not support --stage vlm yet")
    probs = dict(show_probs=args.show_probs, top_alternatives=args.top_alternatives)
    if args.prompt:
        return converse(chat, args.prompt, interactive=False, **probs)
    return converse(chat, _stdin_lines(), interactive=True, **probs)


if __name__ == "__main__":
    run_main(main)
