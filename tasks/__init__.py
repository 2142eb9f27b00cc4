"""Offline, seeded data generators for kvbench's tasks. A task is defined once, by its lm-eval YAML in
`tasks/lm_eval/` (which prompts, which metric, generation limits); the modules here only generate its data:
`needle` (passkey haystacks), `rope` (copying at controlled distances), `multiturn` (conversations with a code per
turn), `longgen` (long-generation prompts), `ruler` (the RULER-style suite), `prose` (the pydoc prose they use)."""
