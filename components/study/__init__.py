"""Method studies: several adapter variants trained over several seeds and evaluated on one held-out
split. results.py turns the finished trials into the per-variant table (mean, spread, confidence
interval, change and paired tests against a reference variant) as Markdown or CSV; figure.py draws
Figure 5 (a metric against trainable adapter size). Both are pure: no Ray, no MLflow."""
