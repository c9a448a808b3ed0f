"""`python -m bench`: llm_stages against TRL 1.16 in the same run (see bench/runner.py)."""

import sys

from bench.runner import main

sys.exit(main())
