"""Start-up warnings a user cannot act on, silenced before the libraries that print them are imported.

Imported first by the stages that import trl (which imports peft, which imports bitsandbytes):
bitsandbytes' CPU backend looks for an optional kernel package on import and logs a warning when it
is absent, although its built-in CPU path works (tests/test_sft.py trains with --qlora on CPU).
Where DeepSpeed is installed, transformers imports it and it warns on a machine without a GPU that it
is "setting accelerator to CPU": that is what a CPU run wants.
"""

from __future__ import annotations

import logging


class _DropMessage(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropMessage("Failed to load CPU gemm_4bit_forward"))
logging.getLogger("DeepSpeed").addFilter(_DropMessage("Setting accelerator to CPU"))
