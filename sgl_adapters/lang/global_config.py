"""`sgl.global_config`: SGLang's process-wide frontend settings.

`default_backend` is the one slot `set_default_backend` writes (lock-guarded); the other fields
keep SGLang's names and defaults and are read when a program starts.
"""

from __future__ import annotations

import threading
from typing import Any


class GlobalConfig:
    """SGLang's `GlobalConfig`. Fields:

    - `default_backend`: the backend of programs run without `backend=`.
    - `verbosity`: 2 prints each program's final text when it ends (0: silent).
    - `skip_special_tokens_in_output`, `spaces_between_special_tokens_in_out`: detokenisation
      options sent with every `gen`.
    - `enable_precache_with_tracing`: `run_batch` first prefills the prefixes its programs
      share, found by tracing them (the default for `run_batch(prewarm=...)`).
    - `enable_parallel_encoding`: accepted, no effect: `join("concate_and_append")` appends
      the branches' text and the radix cache reuses their KV by prefix.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._default_backend: Any = None
        self.verbosity = 0
        self.skip_special_tokens_in_output = True
        self.spaces_between_special_tokens_in_out = True
        self.enable_precache_with_tracing = True
        self.enable_parallel_encoding = True

    @property
    def default_backend(self) -> Any:
        with self._lock:
            return self._default_backend

    @default_backend.setter
    def default_backend(self, backend: Any) -> None:
        with self._lock:
            self._default_backend = backend

    def detokenize_options(self) -> dict[str, bool]:
        """The sampling params the two output options add (only where they differ from the
        engine defaults, so servers that lack them are not sent them needlessly)."""
        out = {}
        if not self.skip_special_tokens_in_output:
            out["skip_special_tokens"] = False
        if not self.spaces_between_special_tokens_in_out:
            out["spaces_between_special_tokens"] = False
        return out


global_config = GlobalConfig()
