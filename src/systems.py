"""Every composition method that exists: the one list that registers them, in table order.

Each system's module holds its math and its `compose.Method` entries; this file imports them
and registers one instance each, in the order `--methods all`, `--list-methods` and the
result tables use. A new method is its module plus one line here (docs/compose.md).
Import this module (full_evaluation.py and src/report.py do) before reading the registry.
"""
from __future__ import annotations

from src import arrow, lorahub, merge, merging, mixer, moa, multitask, retrieval, smile, t2l
from src.compose import Base, Oracle, register

for method in [
    Base(),
    Oracle(),
    moa.MoA(),
    moa.MoAStudy(),
    arrow.Arrow(),
    *(mixer.LoRAMixerMethod(regime) for regime in mixer.REGIMES),
    lorahub.LoraHub(),
    lorahub.LoraHubTask(),
    t2l.T2L(),
    t2l.T2LZeroShot(),
    *(merge.Merge(name) for name in [*merging.MERGES, *merging.VARIANTS]),
    retrieval.Retrieval(),            # after the merges: the order up to them is the one users know
    lorahub.RandomMerge(),
    smile.Smile(),
    multitask.MultitaskLoRA(),
]:
    register(method)
