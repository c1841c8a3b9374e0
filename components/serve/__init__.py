"""Serving: the OpenAI-compatible Ray Serve endpoint over fine-tuned versions (app.py is the entry point)."""
