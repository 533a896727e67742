"""Training: the engines and the loop (plain torch, `kinds.Engine`), and their runners.

Entry points: `local.train_local` (one process, `--no-ray`), `trainer.train_on_ray` /
`build_trainer` (Ray Train: the driver; `worker.worker_loop` runs on each worker),
`checkpoint.load_checkpoint` / `good_checkpoint` (the one checkpoint loader).
"""
