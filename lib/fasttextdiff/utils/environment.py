"""Process environment defaults, set by the entry points (the CLI, the server app, the benchmarks and
the tests call `apply_process_defaults()` before torch loads); importing the library changes nothing.
A value the user exported wins.

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


def apply_process_defaults() -> dict[str, str]:
    """Set each default the user has not exported; returns the ones set now."""
    applied = {}
    for name, value in DEFAULTS.items():
        if name not in os.environ:
            os.environ[name] = value
            applied[name] = value
    return applied
