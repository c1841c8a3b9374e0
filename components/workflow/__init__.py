"""How the pieces connect into what a user runs: the shared start-up (startup.py), a training stage as a
tracked, reusable step (tracked_stage.py), evaluations (evaluation.py), the full pipeline (full.py) and
the sweep (sweep.py). Each step is recognised as done by what it left behind (steps.py)."""
