"""duet's adapter methods, laid out as PEFT lays out its tuners: the shared base, one module per method,
and `apply.py`, the `adapter.type` switch (PEFT's own LoRA, Dual-LoRA, the Table-1 mixtures)."""
