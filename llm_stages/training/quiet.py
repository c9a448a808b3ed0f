"""Third-party notices that say nothing about a run, kept out of its output: each one named by its
logger and message (or warning text), so every other warning of the same library still shows.
The W&B notice about its `anonymous` setting is avoided where it starts, in
llm_stages.training.loggers.WandbLogger."""

from __future__ import annotations

import logging
import re
import warnings

# logger name -> messages dropped from it (regular expressions matched at the start of the message).
NOTICES: dict[str, tuple[str, ...]] = {
    # bitsandbytes on CPUs with AVX-512 BF16 looks for an optional kernels package at import; without
    # it, it falls back to its own kernel (4-bit CPU inference only) and says so on every import.
    "bitsandbytes.backends.cpu.ops": (r"Failed to load CPU gemm_4bit_forward from kernels-community",),
    # Lightning advertises its cloud services at every Trainer; other rank-zero infos stay.
    "lightning.pytorch.utilities.rank_zero": (r"💡 Tip:",),
    "lightning.fabric.utilities.rank_zero": (r"💡 Tip:",),
    # A checkpoint's generation_config.json with sampling settings next to do_sample=false: generation
    # here passes its own settings each call (rollout.generation, chat's generation).
    "transformers.generation.configuration_utils": (r"The following generation flags are not valid",),
    "transformers.generation.utils": (r"Setting `pad_token_id` to `eos_token_id`",),
}

# Deprecations inside torch/Lightning internals that a user cannot act on.
DEPRECATIONS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"`?torch\.utils\._pytree\._register_pytree_node`? is deprecated",
)


class DropMessages(logging.Filter):
    """Drops a logger's records whose message starts with one of `patterns`."""

    def __init__(self, patterns: tuple[str, ...]):
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def quiet_third_party() -> None:
    """Install the filters (again is harmless: each logger gets one). Logger filters can be set
    before the library is imported: its `logging.getLogger(name)` returns the same logger."""
    for name, patterns in NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropMessages) for f in logger.filters):
            logger.addFilter(DropMessages(patterns))
    for message in DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message)
    one_console_line_per_record()


def one_console_line_per_record() -> None:
    """Lightning gives its `lightning` logger a console handler of its own at import and still lets
    the records reach the root logger: once the run's logging is set up (Hydra's console and file
    handlers on the root), every Lightning info ("Seed set to 1234", "GPU available: ...") printed
    twice. Its own handler goes then; its records still reach the console, and the run's log file, once."""
    root = logging.getLogger()
    if not any(type(h) is logging.StreamHandler for h in root.handlers):
        return  # no console handler on the root (a library use, a test): Lightning's is the only one
    lightning = logging.getLogger("lightning")
    for handler in list(lightning.handlers):
        if type(handler) is logging.StreamHandler:
            lightning.removeHandler(handler)
