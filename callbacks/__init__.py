"""Lightning callbacks shipped with llm_stages (referenced from conf/callbacks by _target_)."""
