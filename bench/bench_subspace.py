"""Benchmark: KnOTS, Core Space, TSV and Iso-C from the factors, next to our svd and next to the
same merges done in full space (dense [out, in] deltas), on Qwen2-1.5B shapes.

    python bench/bench_subspace.py            # full run (a few minutes on 2 CPU cores), updates bench/RESULTS.md
    python bench/bench_subspace.py --smoke    # tiny shapes, seconds, prints only

Seven random rank-8 adapters (alpha 16) on the six adapted projections of Qwen2-1.5B, 28 layers
(bench_merge.py's shapes). Times, in one run:

  * ours: the whole 28-layer merge through `merge_adapters` for knots, core_space (ta, ties,
    tsv), tsv, iso_c, and the study's svd for scale;
  * full space: the same merge computed as its paper states it, on dense deltas (KnOTS: SVD of
    the [out, 7 in] concatenation; Core Space's merges: on the [out, in] deltas themselves, as
    task arithmetic / TIES / TSV-Merge do without the core space; Iso-C: dense SVD of the sum),
    one layer of each distinct shape, scaled by how many of it the model holds;

and checks ours against the same merge in float64 full space on the attention layers (relative
Frobenius error; the float32 dense SVD of [out, 7 in] is itself off by ~1e-2 on random adapters,
whose nearly equal singular values make KnOTS' basis ill-conditioned).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_eval import write_section  # noqa: E402
from bench.bench_merge import FULL, MODULE_PATH, SMOKE, machine, random_factors, rel_err  # noqa: E402
from src.lora import make_adapter  # noqa: E402
from src.merging import magnitude_prune, merge_adapters, polar  # noqa: E402

DENSITY = 0.2
CHECKED = 1536 * 1536   # layers up to this size are also merged in float64 full space, to check ours against
SAME = {"svd", "knots", "core_space (ta)", "core_space (tsv)", "tsv", "iso_c"}   # the same merge in both spaces
METHODS = [("svd", "svd", {}), ("knots", "knots", {"density": DENSITY}), ("core_space (ta)", "core_space", {}),
           ("core_space (ties)", "core_space", {"core_merge": "ties", "density": DENSITY}),
           ("core_space (tsv)", "core_space", {"core_merge": "tsv"}), ("tsv", "tsv", {}), ("iso_c", "iso_c", {})]


# --------------------------------------------------------------------------- full space, dense

def dense_ties(ts: list[torch.Tensor], density: float) -> torch.Tensor:
    stack = torch.stack([magnitude_prune(t, density) for t in ts])
    elected = torch.where(stack.sum(0) >= 0, 1.0, -1.0).to(stack.dtype)
    agree = (stack.sign() == elected).to(stack.dtype)
    return (stack * agree).sum(0) / agree.sum(0).clamp(min=1)


def dense_tsv(ds: list[torch.Tensor], r: int) -> torch.Tensor:
    us, ss, vs = [], [], []
    for d in ds:
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        us.append(u[:, :r])
        ss.append(s[:r])
        vs.append(vh[:r].T)
    return polar(torch.cat(us, 1)) @ torch.diag(torch.cat(ss)) @ polar(torch.cat(vs, 1)).T


def full_space(method: str, opts: dict, ds: list[torch.Tensor], r: int, noise: float = 1e-5) -> torch.Tensor:
    if method == "knots":
        in_f = ds[0].shape[1]
        u, s, vh = torch.linalg.svd(torch.cat(ds, 1), full_matrices=False)
        k = int((s > noise * s[0]).sum())
        reps = [s[:k, None] * vh[:k, i * in_f:(i + 1) * in_f] for i in range(len(ds))]
        return u[:, :k] @ dense_ties(reps, opts["density"])
    if method == "core_space":
        merge = opts.get("core_merge", "ta")
        if merge == "ta":
            return sum(ds)
        return dense_ties(ds, opts["density"]) if merge == "ties" else dense_tsv(ds, r)
    if method == "tsv":
        return dense_tsv(ds, r)
    if method == "iso_c":
        u, s, vh = torch.linalg.svd(sum(ds), full_matrices=False)
        k = int((s > noise * s[0]).sum())
        return s[:k].mean() * u[:, :k] @ vh[:k]
    u, s, vh = torch.linalg.svd(sum(ds) / len(ds), full_matrices=False)     # svd: top r of the mean
    return (u[:, :r] * s[:r]) @ vh[:r]


def run(cfg: dict) -> dict:
    g = torch.Generator().manual_seed(0)
    n, r, alpha, layers = cfg["adapters"], cfg["rank"], cfg["alpha"], cfg["layers"]
    s = alpha / r
    modules = {f"model.layers.{i}.{MODULE_PATH[m]}.{m}": shape for i in range(layers) for m, shape in cfg["shapes"].items()}
    adapters = []
    for t in range(n):
        factors = {name: random_factors(o, i, r, g) for name, (o, i) in modules.items()}
        adapters.append(make_adapter(factors, {name: s for name in modules}, None, name=f"t{t}"))
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, shape in modules.items():
        by_shape.setdefault(shape, []).append(name)

    rows = []
    for label, method, opts in METHODS:
        t0 = time.perf_counter()
        merged = merge_adapters(adapters, method, **opts)
        ours = time.perf_counter() - t0
        full, err = 0.0, 0.0
        for shape, names in by_shape.items():
            name = names[0]
            ds = [s * b @ a for a, b in (ad.factors[name] for ad in adapters)]
            t0 = time.perf_counter()
            full_space(method, opts, ds, r)                        # timed in float32, as a user would run it
            full += (time.perf_counter() - t0) * len(names)
            if label in SAME and shape[0] * shape[1] <= CHECKED:   # checked against float64 (not timed)
                exact = [s * b.double() @ a.double() for a, b in (ad.factors[name] for ad in adapters)]
                want = full_space(method, opts, exact, r, noise=1e-9)
                err = max(err, rel_err(merged.delta(name), want))
            elif label not in SAME:
                err = float("nan")
            del ds
        rank = max(a.shape[0] for a, _ in merged.factors.values())
        rows.append({"method": label, "ours": ours, "full": full, "err": err, "rank": rank})
        print(f"  {label:<18} ours {ours:7.2f} s   full space {full:8.1f} s   {full / ours:6.0f}x   "
              f"rel err {err:.1e}   rank {rank}", file=sys.stderr)
    return {"rows": rows, "modules": len(modules)}


def table(res: dict) -> str:
    svd_t = next(r["ours"] for r in res["rows"] if r["method"] == "svd")
    lines = ["| method | ours, whole model (s) | x our svd | same merge in full space (s) | speed-up | "
             "rel. error vs float64 full space | rank |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        err = f"{r['err']:.1e}" if r["err"] == r["err"] else "n/a (TIES on other coordinates: another merge)"
        lines.append(f"| {r['method']} | {r['ours']:.2f} | {r['ours'] / svd_t:.2f} | {r['full']:.1f} | "
                     f"{r['full'] / r['ours']:.0f}x | {err} | {r['rank']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, seconds; prints only")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = SMOKE if args.smoke else FULL
    t0 = time.perf_counter()
    res = run(cfg)
    wall = time.perf_counter() - t0
    tab = table(res)
    print(tab)
    worst = max(r["err"] for r in res["rows"] if r["err"] == r["err"])
    ok = worst <= 1e-4
    print(f"\nworst relative error vs full space {worst:.1e} (must be <= 1e-4): {'OK' if ok else 'FAIL'}; "
          f"wall {wall:.0f} s")
    if not args.smoke:
        core = {r["method"]: r for r in res["rows"]}
        write_section("\n".join([
            "## Merges in a shared basis",
            "",
            "`python bench/bench_subspace.py`: KnOTS, Core Space, TSV and Iso-C computed from the factors "
            f"(src/merging.py) on {cfg['adapters']} random rank-{cfg['rank']} adapters (alpha {cfg['alpha']:g}), "
            f"Qwen2-1.5B shapes, {cfg['layers']} layers x 6 modules ({res['modules']} merged modules), next to our "
            "`svd` and next to the same merge done in full space on the dense [out, in] deltas (float32; one "
            "layer of each shape, times its count in the model; the error column is against float64 full space on the "
            "q/k/v layers). TIES inside KnOTS and Core Space at density "
            f"{DENSITY}. Torch threads: {args.threads}.",
            "",
            f"Machine: {machine()}. Measured {time.strftime('%Y-%m-%d')}; bench wall time {wall:.0f} s.",
            "",
            tab,
            "",
            f"Core Space against full space: task arithmetic {core['core_space (ta)']['full'] / core['core_space (ta)']['ours']:.0f}x, "
            f"TIES {core['core_space (ties)']['full'] / core['core_space (ties)']['ours']:.0f}x, "
            f"TSV {core['core_space (tsv)']['full'] / core['core_space (tsv)']['ours']:.0f}x "
            "(the paper reports up to 600x on Llama 3 8B). Core Space's TIES trims the cores' entries, full-space TIES "
            "the deltas' entries: two different merges, timed side by side, not compared. The errors are against "
            "the same merge computed densely in float64 on the q/k/v layers.",
        ]), title="Merges in a shared basis")
        print("updated bench/RESULTS.md (section Merges in a shared basis)")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
