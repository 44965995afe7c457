"""One lock for every model load in a process.

transformers' model loading is not thread-safe: while it builds a model it swaps global
torch state (the default dtype, weight initialisation turned off). Two loads at once in
one process, say the router's embedder and the inference service's base model in
``python -m airoboros.lmoe.api``, can leave a model with uninitialised weights. Every
load (sentence-transformers, transformers, peft adapters) takes this lock.
"""

from __future__ import annotations

import threading

MODEL_LOAD_LOCK = threading.RLock()
