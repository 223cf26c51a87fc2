"""Process environment defaults, applied on import (before torch loads): offline, quiet, passive OpenMP.

The CLI, the MONAI Label app, the benchmarks and the tests import this first; a value the user
exported always wins (``setdefault``).

* ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE``: nothing is fetched from a hub unless the user opts
  in by exporting 0 (see README).
* ``TOKENIZERS_PARALLELISM``: the Rust tokenizer's threads warn and deadlock-guard after a fork
  (DataLoader workers, ``accelerate launch``).
* ``OMP_WAIT_POLICY``: OpenMP threads that spin while waiting make torch ~10x slower whenever
  another process shares the cores (measured: a training step 2.6 s -> 0.25 s on a loaded 2-core
  machine); it must be set before torch loads its OpenMP runtime.
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
