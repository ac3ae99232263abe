"""Training: the one loop (`trainer`) on objects the builder made (`training_run`), one optimizer step,
the derived per-epoch draws, evaluation, checkpoints and their contents, metrics tracking, what processes
agree on, and the run's outputs. Imports no configuration module (tests/test_architecture.py)."""
