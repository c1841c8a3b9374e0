"""duet: model."""
