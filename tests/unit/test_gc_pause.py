"""The collector is held off during discovery and always given back."""

import gc

import pytest
import torch
from torch import nn

import distclip
from distclip import gc_pause
from distclip.layout import discovery as layout


def test_paused_restores_the_collector():
    assert gc.isenabled()
    with gc_pause.paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(KeyError), gc_pause.paused():
        raise KeyError("x")
    assert gc.isenabled()  # also after an exception
    gc.disable()
    try:
        with gc_pause.paused():
            pass
        assert not gc.isenabled()  # a collector the caller disabled stays disabled
    finally:
        gc.enable()


def test_discovery_runs_without_collections_and_bad_input_gives_the_collector_back(monkeypatch):
    seen = []
    real = layout.local_layout

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(layout, "local_layout", spy)
    monkeypatch.setattr(distclip.layout.plan, "local_layout", spy)
    params = [nn.Parameter(torch.ones(3)) for _ in range(3)]
    for p in params:
        p.grad = torch.ones(3)
    for _ in range(3):  # discovery, then the plan's own discovery
        distclip.clip_grad_norm_(params, 1.0)
    assert seen and not any(seen)
    with pytest.raises(TypeError):
        distclip.clip_grad_norm_(params + ["x"], 1.0)  # type: ignore[operator]
    assert gc.isenabled()
