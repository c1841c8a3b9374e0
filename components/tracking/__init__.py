"""MLflow tracking: the tracker (runs, params, inputs, lineage, models), the outage buffer for per-step
metrics, redaction of credentials, curve plots, and every `duet.*` tag name (tags.py)."""
