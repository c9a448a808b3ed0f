"""Lightning plumbing shared by every stage: strategies and sharding, optimisers, the run directory
and atomic checkpoints, loggers, exports, performance counters and W&B tables."""
