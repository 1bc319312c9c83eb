"""Serve any stage's checkpoint with an OpenAI-compatible API and a web chat.

    python scripts/serve.py --stage sft                  # http://127.0.0.1:8000 : the web chat
    python scripts/serve.py --stage dpo --port 8080

Then any OpenAI client talks to it:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "What is 47 + 25?"}])

`POST /v1/chat/completions` takes messages, stream, temperature, top_p, max_tokens, stop, logprobs
and top_logprobs; the web chat at / streams replies and colours each token by its probability.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from trainer.lib.runtime import run_main, setup_logging
from trainer.lib.stages import StageError, resolve_model


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", default="sft", help="stage name (its latest checkpoint under --out_dir) or a model dir")
    p.add_argument("--out_dir", default="training", help="root of the stages' outputs")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = p.parse_args(argv)
    setup_logging()

    import uvicorn
    from transformers import AutoConfig

    import model as _registers_minimind  # noqa: F401  (AutoConfig learns model_type "minimind")
    from server.app import create_app
    from trainer.lib.metrics import load_model

    model_dir = resolve_model(args.stage, Path(args.out_dir), flag="--stage")
    kind = AutoConfig.from_pretrained(model_dir).model_type
    if kind != "minimind":
        raise StageError(f"--stage {args.stage}: {model_dir} is a {kind} model; the server serves chat language models")
    model, tokenizer = load_model(model_dir, args.device)
    if not tokenizer.chat_template:
        raise StageError(f"{model_dir}: the tokenizer has no chat template; train the tokenizer with python trainer/train_0_tokenizer.py")
    name = args.stage if "/" not in args.stage else model_dir.name
    print(f"serving {model_dir} as '{name}' on http://{args.host}:{args.port} (web chat at /, API at /v1)", flush=True)
    uvicorn.run(create_app(model, tokenizer, name), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    run_main(main)
