"""Marks kept by distclip, one process: a tensor marked while no module holds it is let go once
the user lets go of it (no weakref on it, so the table checks the reference count at each call)."""

from __future__ import annotations

import gc
import weakref

import torch

from distclip.layout.marks import Annotation, GroupInfo, Marks


def test_a_loose_tensor_is_let_go_with_the_user():
    t = torch.zeros(3)
    Marks.loose[id(t)] = t
    Marks.prune()
    assert id(t) in Marks.loose  # the user still holds it
    probe = torch.zeros(1)
    probe_ref = weakref.ref(probe)  # not on ``t``: a weakref there is what distclip must never need
    t.probe = probe  # freed with ``t``
    del probe
    key = id(t)
    del t
    Marks.prune()
    gc.collect()
    assert key not in Marks.loose and probe_ref() is None


def test_a_mark_pickles_without_a_group():
    import pickle

    mark = Annotation((GroupInfo(frozenset({0, 1})),), GroupInfo(frozenset({0, 2})))
    assert pickle.loads(pickle.dumps(mark)) == mark and mark.pieces == 2
