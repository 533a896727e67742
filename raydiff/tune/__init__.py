"""The noise-schedule x loss ablation on Ray Tune (`raydiff tune`).

Entry points: `ablation.run_ablation` (the sweep: each trial a Ray Train run, ASHA or FIFO),
`results.finish` (the results table, convergence figure, yardsticks and best checkpoint),
`space.validate_search_space` / `param_space` (the YAML search space, checked before Ray starts).
"""
