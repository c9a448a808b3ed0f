"""One module per record kind — text (PT), conversation (SFT), pair (RM, DPO), unpaired (KTO),
prompt (PPO, GRPO) — each reading its records (the formats it detects), rendering
them to token ids and labels, collating them into its batch type, and describing them for
`python -m llm_stages.data inspect`. The DataModules, the stages and `inspect` use them alike;
what the kinds share stays in `llm_stages/data/` (sources, columns, messages, template, render,
collate, describe)."""
