"""Building blocks of the flagship example (`examples/train_lm.py`).

A byte-level GPT trained with tensor parallelism on the Python standard library's sources:
`devices` (fake CPU devices; import it before jax), `data`, `model`, `optimizers`, `train`
(`train(config) -> metrics`) and `report` (table, CSV/JSON, PNG). Importing this package does not
import jax, so `devices.use_cpu_devices` can still take effect.
"""

# Names accepted by `optimizers.build` (kept here, free of jax, for the command line).
OPTIMIZERS = ("muonbp", "muon", "blockmuon", "adamw", "optax_muon")
