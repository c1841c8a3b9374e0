"""duet: components."""
