"""``shadowgraft demo``: the whole Shadow-FT graft on a tiny offline trio."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from rich.console import Console

from .checkpoint import Checkpoint
from .graft import apply
from .synthetic import Shape, make_trio


def run_demo(workdir: str | Path = "demo-out", *, console: Console | None = None) -> dict:
    """Build base/instruct/tuned (Llama-shaped, bf16, 2 shards), graft, and check the result in float64."""
    con = console or Console()
    root = Path(workdir)
    shutil.rmtree(root, ignore_errors=True)
    con.print(f"[bold]1.[/] building a tiny Llama-shaped trio under {root}/ (base, instruct, tuned)")
    paths = make_trio(root, shape=Shape(layers=4, hidden=64, intermediate=160, vocab=256), shard_bytes=300_000)
    report = None
    try:
        from .stats import stats as compare
    except ImportError:  # stats is optional in older builds
        compare = None
    if compare is not None:
        con.print("[bold]2.[/] how far apart are base and instruct? (the paper's relative gap sigma)")
        report = compare(paths["base"], paths["instruct"])
        report.print(con)
    out = root / "grafted"
    con.print(f"[bold]3.[/] grafting instruct + (tuned - base) into {out}/")
    res = apply(instruct=paths["instruct"], base=paths["base"], tuned=paths["tuned"], output=out, overwrite=True)
    con.print(f"    {res.stats.grafted} tensors grafted, {res.stats.copied} copied, "
              f"{res.stats.bytes_written / 1e6:.2f} MB in {res.stats.seconds:.3f} s")
    worst = _check(paths, out, res.plan.grafted)
    con.print(f"[bold]4.[/] checked every grafted tensor against a float64 reference: max error {worst:.2f} ulp(bf16)")
    con.print(f"[green]done[/]: load {out} with transformers like the instruct model it came from")
    return {"paths": paths, "output": out, "stats": res.stats, "report": report, "max_ulp": worst}


def _check(paths: dict, out: Path, grafted: list[str]) -> float:
    cks = {k: Checkpoint.open(v) for k, v in paths.items()}
    got = Checkpoint.open(out)
    worst = 0.0
    for name in grafted:
        i, t, b = (cks[k].view(name).double() for k in ("instruct", "tuned", "base"))
        ref = i + (t - b)
        y = got.view(name)
        ulp = (ref.to(y.dtype).double() - ref).abs().clamp_min(0)
        spacing = torch.finfo(y.dtype).eps * ref.abs().clamp_min(torch.finfo(y.dtype).tiny)
        worst = max(worst, float(((y.double() - ref).abs() / spacing).max()))
        del ulp
    return worst
