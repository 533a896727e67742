"""Evaluation of trained checkpoints (no Ray unless scoring on Ray Data is asked for).

Entry points: `evaluate.evaluate` (`raydiff eval`: every metric of one checkpoint on held-out
data), `generate.generate` / `write_samples` (`raydiff sample`), `loading.load_diffusion` /
`load_reference` (a run's newest good checkpoint, ready to use), `metrics` (the pure metric
functions of docs/design.md §6), `scoring` (per-example mse and accuracy, in process or on Ray
Data), `report` (tables and JSON).
"""
