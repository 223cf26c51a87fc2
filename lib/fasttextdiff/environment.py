"""Process environment defaults, applied on import: the CLI, the app, the benchmarks and the tests
import this before torch loads; a value the user exported wins.

Hubs offline unless the user opts in (README); no tokenizer threads across forks (DataLoader
workers, ``accelerate launch``); passive OpenMP: spinning threads make torch ~10x slower whenever
another process shares the cores (a training step 2.6 s -> 0.25 s on a loaded 2-core machine).
"""

import os

DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_WAIT_POLICY": "PASSIVE",
}

for _name, _value in DEFAULTS.items():
    os.environ.setdefault(_name, _value)
