"""Check that the benchmarked tools computed the same graft, on a sample of tensors.

For the first and last layer's projections, the reference is the exact
``I + (T - B)`` in float64 rounded once to bf16, and every output is also
compared with the paper script's output. The paper script rounds ``T - B`` to
bf16 before adding it, which is not "at most one ulp" off: where ``I`` and
``T - B`` nearly cancel, the result is tiny and that early rounding is many of
its ulps. So two outputs count as agreeing when they differ by at most half
an ulp of ``T - B`` plus one ulp of the result, the most that rounding can
explain. Copied tensors (norms, embeddings, lm_head) must be byte-identical
to instruct's.
"""

from __future__ import annotations

from pathlib import Path

from common import Trio, print_table

GRAFTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def sample_names(trio: Trio) -> list[str]:
    last = trio.shape.layers - 1
    names = [n for n, _ in trio.shape.tensors()]
    keep = [n for n in names if n.startswith(("model.layers.0.", f"model.layers.{last}."))]
    return keep + [n for n in names if not n.startswith("model.layers.")]


def _locate(folder: Path) -> dict[str, Path]:
    from safetensors import safe_open

    where = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            where.update({k: f for k in fh.keys()})
    return where


def _get(where: dict[str, Path], name: str):
    from safetensors import safe_open

    with safe_open(str(where[name]), framework="pt") as fh:
        return fh.get_tensor(name)


def ulps(a, b):
    """Distance between two bf16 tensors in units in the last place (0 = identical bits)."""
    import torch

    def ordered(x):
        i = x.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -32768 - i, i)  # sign-magnitude -> monotone integers

    return (ordered(a) - ordered(b)).abs()


def ulp_of(x64):
    """Size of one bf16 ulp at each value of the float64 tensor ``x64``."""
    import torch

    _, e = torch.frexp(x64)
    u = torch.ldexp(torch.ones_like(x64), e - 8)  # bf16 keeps 8 significant bits
    return torch.where(x64 == 0, torch.full_like(x64, 2.0 ** -133), u)


def verify_outputs(trio: Trio, outputs: dict[str, Path], *, markdown: list[str] | None = None) -> bool:
    """Print one row per output folder; False when a shadowgraft output is off (see the module docstring).

    >>> verify_outputs(trio, {"shadowgraft": Path("out/cpu"), "paper": Path("out/paper")})  # doctest: +SKIP
    """
    import torch

    outputs = {k: v for k, v in outputs.items() if v.is_dir()}
    if not outputs:
        return True
    src = {w: _locate(getattr(trio, w)) for w in ("instruct", "base", "tuned")}
    found = {label: _locate(p) for label, p in outputs.items()}
    paper = next((k for k in outputs if k.startswith("paper")), None)
    names = sample_names(trio)
    stats = {k: {"n": 0, "exact": 0, "ulp": 0, "same_paper": 0, "near_paper": 0, "copied_bad": 0, "missing": 0}
             for k in outputs}
    for name in names:
        inst = _get(src["instruct"], name)
        grafted = any(g in name for g in GRAFTED)
        if grafted:
            delta = _get(src["tuned"], name).double() - _get(src["base"], name).double()
            exact = inst.double() + delta
            ref = exact.to(torch.bfloat16)
            slack = 0.5 * ulp_of(delta) + ulp_of(exact)
            ref_paper = _get(found[paper], name) if paper and name in found[paper] else None
        for label, where in found.items():
            s = stats[label]
            if name not in where:
                s["missing"] += 1
                continue
            got = _get(where, name)
            if not grafted:
                s["copied_bad"] += int(not torch.equal(got.view(torch.int16), inst.view(torch.int16)))
                continue
            d = ulps(got, ref)
            s["n"] += d.numel()
            s["exact"] += int((d == 0).sum())
            s["ulp"] = max(s["ulp"], int(d.max()))
            if ref_paper is not None:
                s["same_paper"] += int((got.view(torch.int16) == ref_paper.view(torch.int16)).sum())
                s["near_paper"] += int(((got.double() - ref_paper.double()).abs() <= slack).sum())
    ok = True
    rows = []
    for label, s in stats.items():
        n = max(s["n"], 1)
        row = [label, f"{s['n']:,}", f"{100 * s['exact'] / n:.4f}%", str(s["ulp"])]
        row += [f"{100 * s['same_paper'] / n:.4f}%", f"{100 * s['near_paper'] / n:.4f}%"] if paper else ["—", "—"]
        row.append("all" if not s["copied_bad"] else f"{s['copied_bad']} differ")
        if label.startswith("shadowgraft"):
            good = (not s["missing"] and not s["copied_bad"] and s["ulp"] <= 1
                    and (not paper or s["near_paper"] == s["n"]))
            ok &= good
            row.append("PASS" if good else "FAIL")
        else:
            row.append("missing tensors" if s["missing"] else "info")
        rows.append(row)
    print_table(
        f"agreement on {len(names)} sampled tensors (layers 0 and {trio.shape.layers - 1}, embeddings, norms, head); "
        "exact = float64 I + (T - B) rounded once to bf16; near = within the paper's bf16 rounding of T - B",
        ["output", "grafted elements", "identical to exact", "max ulp vs exact", "identical to paper script",
         "near paper script", "copied tensors identical", "check"], rows, markdown=markdown)
    return ok
