"""CLI: python -m llm_stages.data inspect [--json] [hydra overrides of the main config...]

Shows what a stage's data becomes (files, format, counts, token lengths, the first example with
its trained tokens marked) without loading model weights. See llm_stages/data/inspect.py.
"""

from __future__ import annotations

import json
import logging
import sys

USAGE = ("usage: python -m llm_stages.data inspect [--json] [overrides...]   "
         "e.g. python -m llm_stages.data inspect stage=sft data=file data.path=chat.jsonl")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    if not args or args[0] != "inspect":
        print(USAGE, file=sys.stderr)
        return 2
    overrides = [a for a in args[1:] if a != "--json"]
    as_json = len(overrides) < len(args) - 1

    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from llm_stages.data.inspect import inspect_overrides, render_report
    from llm_stages.errors import ConfigError, DataFormatError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        report = inspect_overrides(overrides)
    except (DataFormatError, ConfigError, HydraException, OmegaConfBaseException) as e:
        # A user's mistake (bad file, bad override), not a bug: one clear message, no traceback.
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if as_json else render_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
