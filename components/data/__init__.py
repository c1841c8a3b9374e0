"""duet: data."""
