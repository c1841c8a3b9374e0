"""Ray Tune sweeps over stage 2: the search space, the sweep driver, the trial ledger that mirrors trials
into MLflow from the driver, and a Ray workaround that gives stopped trials' workers back (placement.py)."""
