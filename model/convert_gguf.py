"""MiniMind -> GGUF (llama.cpp, ollama) through llama.cpp's own converter, not a copy of it.

The weights take the road every Qwen3 model takes: export to a stock `Qwen3ForCausalLM` directory
(model/convert.py), then llama.cpp's `convert_hf_to_gguf.py` writes the GGUF file. The one step that
needs care is the tokenizer. llama.cpp re-implements each known pre-tokenizer (the regex that cuts
text into pieces before BPE) in C++, and its converter recognises which one a model uses by hashing
the ids a test string encodes to. That hash depends on the vocabulary, so a vocabulary trained here
is never recognised, and the converter stops with "BPE pre-tokenizer was not recognized".

The course's tokenizer splits text with exactly Qwen2's rule (dataset/pre_tokenizer.py), so we tell
the converter `qwen2`, and only after checking that tokenizer.json says so: its pre_tokenizer entry
equals Qwen2's and it has no normaliser. tests/test_gguf.py proves the claim where llama-cpp-python is
installed: llama.cpp's token ids equal ours on demo and real text, and its greedy tokens equal ours.

The converter ships in the llama-cpp-python source distribution (vendor/llama.cpp, with its own
gguf-py); it needs torch, transformers and sentencepiece, which the course already installs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from dataset.pre_tokenizer import LLAMA_CPP_PRE, pre_tokenizer_json

LLAMA_CPP_VERSION = "0.3.36"  # the llama-cpp-python release whose converter and runtime were tested
GET_CONVERTER = (
    f"pip download llama-cpp-python=={LLAMA_CPP_VERSION} --no-deps --no-binary :all: -d /tmp/llama && "
    f"tar xzf /tmp/llama/llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz -C /tmp/llama, then pass "
    f"--llama_cpp /tmp/llama/llama_cpp_python-{LLAMA_CPP_VERSION}/vendor/llama.cpp"
)
OUTTYPES = ("f32", "f16", "bf16", "q8_0")

# Run inside the converter's process: its own gguf-py first, then its pre-tokenizer detection
# answered with the rule tokenizer_mismatch() has already checked.
_SHIM = """
import runpy, sys
llama_dir, pre = sys.argv[1], sys.argv[2]
sys.path[:0] = [llama_dir, llama_dir + "/gguf-py"]
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [llama_dir + "/convert_hf_to_gguf.py", *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# ollama renders chats with Go templates, not the Jinja one inside the GGUF file: the same ChatML
# turns as dataset/chat_template.py, ending with an open assistant turn; <|im_end|> stops a reply.
MODELFILE = """FROM ./{gguf_name}
TEMPLATE \"\"\"{{{{- range .Messages }}}}<|im_start|>{{{{ .Role }}}}
{{{{ .Content }}}}<|im_end|>
{{{{ end }}}}<|im_start|>assistant
\"\"\"
PARAMETER stop <|im_end|>
PARAMETER temperature 0
"""


def modelfile(gguf_name: str) -> str:
    """An ollama Modelfile for a GGUF file in the same directory: `ollama create NAME -f FILE`."""
    return MODELFILE.format(gguf_name=gguf_name)


class GGUFError(ValueError):
    """A checkpoint or setup that cannot become a faithful GGUF file."""


def find_converter(llama_cpp: Path | None) -> Path:
    """The llama.cpp source directory: --llama_cpp, else $LLAMA_CPP_DIR."""
    if llama_cpp is None and os.environ.get("LLAMA_CPP_DIR"):
        llama_cpp = Path(os.environ["LLAMA_CPP_DIR"])
    if llama_cpp is None:
        raise GGUFError(f"GGUF export needs llama.cpp's converter: pass --llama_cpp DIR or set LLAMA_CPP_DIR. "
                        f"Get it with: {GET_CONVERTER}")
    if not (llama_cpp / "convert_hf_to_gguf.py").is_file() or not (llama_cpp / "gguf-py").is_dir():
        raise GGUFError(f"{llama_cpp} is not a llama.cpp source directory (no convert_hf_to_gguf.py and gguf-py/). "
                        f"Get one with: {GET_CONVERTER}")
    return llama_cpp


def tokenizer_mismatch(model_dir: Path) -> str | None:
    """Why llama.cpp's `qwen2` tokenisation would differ from this tokenizer.json, or None if it would not."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return f"{model_dir} has no tokenizer.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    if (spec.get("model") or {}).get("type") != "BPE":
        return f"{path}: model type is {(spec.get('model') or {}).get('type')!r}, llama.cpp's qwen2 vocabulary is BPE"
    if spec.get("normalizer") is not None:
        return f"{path}: it normalises text first ({spec['normalizer'].get('type')}), llama.cpp would not"
    if spec.get("pre_tokenizer") != pre_tokenizer_json():
        return (f"{path}: its pre_tokenizer is not Qwen2's split rule (the course's tokenizer uses it since the "
                f"GGUF export; retrain with python trainer/train_0_tokenizer.py and the stages after it)")
    return None


def qwen3_to_gguf(qwen3_dir: Path, out: Path, outtype: str, llama_cpp: Path, name: str) -> None:
    """Run llama.cpp's converter on an exported Qwen3 directory (`name` becomes general.name); on failure,
    its last lines of output."""
    if outtype not in OUTTYPES:
        raise GGUFError(f"outtype {outtype!r}: expected one of {', '.join(OUTTYPES)}")
    why = tokenizer_mismatch(qwen3_dir)
    if why:
        raise GGUFError(why)
    cmd = [sys.executable, "-c", _SHIM, str(llama_cpp.resolve()), LLAMA_CPP_PRE,
           str(qwen3_dir), "--outfile", str(out), "--outtype", outtype, "--model-name", name]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise GGUFError(f"llama.cpp's converter failed (exit {done.returncode}):\n{tail}")
