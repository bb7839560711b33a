"""Paired bootstrap comparisons of multitask scores.

Every method is scored on the same resamples of each task's examples
(`evaluation.resampled_cells`), so two methods can be compared by the bootstrap of their
difference rather than by whether two intervals overlap: the difference of two multitask scores
is computed on each resample, and its 2.5 and 97.5 percentiles are the interval. The same
resamples give each method's score without one task (translation's effect on the table).
"""
from __future__ import annotations

from typing import Mapping, Sequence

LEVEL = 0.95


def percentiles(values, level: float = LEVEL) -> list[float]:
    """[lo, hi]: the central `level` interval of the resampled values."""
    import numpy as np
    lo_q, hi_q = 50 * (1 - level), 50 * (1 + level)
    return [float(np.percentile(values, lo_q)), float(np.percentile(values, hi_q))]


def ratio_resamples(stats: Mapping, tasks: Sequence[str], methods: Sequence[str]) -> dict:
    """{method: its multitask score on each resample}: the mean over `tasks` of method / oracle,
    on the resamples where no oracle scores 0 (an empty array when there is none)."""
    import numpy as np
    oracle = np.stack([stats[("oracle", t)] for t in tasks])          # [tasks, samples]
    keep = (oracle != 0).all(0)
    return {m: (np.stack([stats[(m, t)] for t in tasks])[:, keep] / oracle[:, keep]).mean(0) for m in methods}


def differences(stats: Mapping, tasks: Sequence[str], methods: Sequence[str],
                scores: Mapping[str, float]) -> dict:
    """{a: {b: {"difference", "interval", "a_better"}}} for each pair with a before b in
    `methods`: score a - score b, the 95% interval of that difference over the paired resamples,
    and the share of resamples where a scores above b."""
    import numpy as np
    ratios = ratio_resamples(stats, tasks, methods)
    out: dict = {}
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            d = ratios[a] - ratios[b]
            if not np.size(d):
                continue
            out.setdefault(a, {})[b] = {"difference": scores[a] - scores[b], "interval": percentiles(d),
                                        "a_better": float((d > 0).mean())}
    return out


def difference(pairs: Mapping, a: str, b: str) -> dict | None:
    """The entry of `differences` for a - b, whichever order the two were stored in."""
    if b in pairs.get(a, {}):
        return dict(pairs[a][b])
    if a in pairs.get(b, {}):
        e = pairs[b][a]
        return {"difference": -e["difference"], "interval": [-e["interval"][1], -e["interval"][0]],
                "a_better": 1.0 - e["a_better"]}
    return None


def without_each(stats: Mapping, tasks: Sequence[str], method: str, scores: Mapping[str, float],
                 oracle: Mapping[str, float]) -> dict:
    """{task: {"score", "interval"}}: the method's multitask score over the other tasks, with its
    interval on the same resamples."""
    import numpy as np
    out = {}
    for t in tasks:
        rest = [x for x in tasks if x != t]
        r = ratio_resamples(stats, rest, [method])[method]
        out[t] = {"score": sum(scores[x] / oracle[x] for x in rest) / len(rest),
                  "interval": percentiles(r) if np.size(r) else None}
    return out
