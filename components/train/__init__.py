"""duet: train."""
