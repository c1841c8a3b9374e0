"""duet: pipelines."""
