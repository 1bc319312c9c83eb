"""How text is cut into pieces before BPE merges: Qwen2's rule, byte for byte.

BPE never merges across a piece boundary, so this split decides what a token can be:
    "I've 12 cats!\n" -> "I" "'ve" " " "1" "2" " cats" "!\n"
- letters form a word with at most one leading non-letter ("cats" keeps its space, "(cats" its bracket);
- every digit is its own piece, so "12" is "1" "2" and arithmetic is learned digit by digit;
- English contractions ('s 't 're 've 'm 'll 'd) split off, any case;
- punctuation runs keep one leading space and trailing newlines; whitespace runs stay whole.
Then every piece becomes UTF-8 bytes shown as printable characters (byte-level), so no text is
ever unknown. There is no normaliser: the text is tokenised exactly as given.

The rule is Qwen2's (and Qwen3's) on purpose: llama.cpp implements a fixed set of split rules in
C++ and recognises this one as `qwen2`, so an exported course model tokenises the same there
(scripts/convert_model.py gguf checks the tokenizer against `pre_tokenizer_json()` before saying so).
"""

from __future__ import annotations

import json

from tokenizers import Regex, pre_tokenizers

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA_CPP_PRE = "qwen2"  # llama.cpp's name for the rule above (tokenizer.ggml.pre)


def qwen2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """The split regex (each match a piece), then byte-level with no prefix space and no second regex."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])


def pre_tokenizer_json() -> dict:
    """The `pre_tokenizer` entry tokenizer.json holds for `qwen2_pre_tokenizer()`, to compare files against."""
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = qwen2_pre_tokenizer()
    return json.loads(tok.to_str())["pre_tokenizer"]
