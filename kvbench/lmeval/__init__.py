"""lm-evaluation-harness integration: the `kvbench-hf`/`asrkf-hf` model types (`adapter`) and kvbench's task folder
for lm-eval (`tasks`)."""
