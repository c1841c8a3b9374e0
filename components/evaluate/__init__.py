"""Evaluation: prompts in the training form (prompts.py), greedy generation (generate.py), the Ray Data
run (run.py), scoring with the paper's task metrics (score.py, metrics.py), tables (report.py) and
held-out examples (examples.py). The served model (components/packaging.py) uses only prompts and
generation."""
