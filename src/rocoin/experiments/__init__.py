"""The end-to-end demo (``demo``) and the paper's evaluation (``paper``), on the real planner,
distillation, runtime and simulator."""
