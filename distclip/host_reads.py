"""The one switch for accelerator paths: may distclip read a device value on the host?

Reading a CUDA tensor on the host (``bool(t)``, ``t.item()``) waits for the device: a host sync
every step (Megatron, DeepSpeed and FSDP1 all carry fixes for this). Reading a CPU tensor is free.
Every decision that differs between the two goes through :func:`host_reads_allowed`:

- allowed (CPU): float32 accumulation with a cheap overflow/underflow check and repair; the
  agreement verdict, another rank's failure and the result dtype are read and acted on (raise on
  every rank, agree on float64);
- not allowed (accelerators, ``meta``): float64 accumulation for bf16/fp32 p-norms (no repair
  needed); a disagreement or another rank's failure poisons the norm (NaN) and leaves every grad
  unscaled, all on the device.

``DISTCLIP_HOST_READS=never`` forces the accelerator path on CPU, so the test suite runs it on a
CPU-only machine; ``auto`` (the default) decides by device.
"""

from __future__ import annotations

import os

import torch

ENV = "DISTCLIP_HOST_READS"


def host_reads_allowed(device: torch.device) -> bool:
    """True if reading a value of a tensor on ``device`` costs no device sync (and is possible)."""
    mode = os.environ.get(ENV, "auto")
    if mode == "never":
        return False
    if mode != "auto":
        raise ValueError(f"distclip: {ENV} must be 'auto' or 'never', got {mode!r}")
    return device.type == "cpu"
