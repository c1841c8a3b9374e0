"""duet's adapter methods, laid out as PEFT lays out its tuners: the shared base, one module per method,
and `apply.py`, the `adapter.type` switch (PEFT's own LoRA, Dual-LoRA, the Table-1 mixtures).

Importing the package lets PEFT's plain loaders (`PeftModel.from_pretrained` without `config=`,
`PeftModel.load_adapter`) rebuild a saved duet adapter with its own class; see `loading.py`."""

from components.model.adapters import loading

loading.install()
