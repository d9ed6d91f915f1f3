"""``shadowgraft demo``: the whole Shadow-FT graft on a tiny offline trio.

The work folder is marked (``shadowgraft-demo.json`` lists what the demo
made), so a second run removes exactly those folders and nothing else; a
folder that holds anything and no mark is refused untouched.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from rich.console import Console

from .checkpoint import Checkpoint
from .compare import stats as compare
from .errors import ShadowgraftError
from .graft import apply
from .synthetic import Shape, make_trio
from .writer import listed

MARK = "shadowgraft-demo.json"
MADE = ("base", "instruct", "tuned", "grafted")  # everything a run creates under the work folder, besides MARK


def run_demo(workdir: str | Path = "demo-out", *, console: Console | None = None) -> dict:
    """Build base/instruct/tuned (Llama-shaped, bf16, 2 shards), graft, and check the result in float64."""
    con = console or Console()
    root = Path(workdir)
    claim_workdir(root)
    con.print(f"[bold]1.[/] building a tiny Llama-shaped trio under {root}/ (base, instruct, tuned)")
    paths = make_trio(root, shape=Shape(layers=4, hidden=64, intermediate=160, vocab=256), shard_bytes=300_000)
    con.print("[bold]2.[/] how far apart are base and instruct? (the paper's relative gap sigma)")
    report = compare(paths["base"], paths["instruct"])
    report.print(con)
    out = root / "grafted"
    con.print(f"[bold]3.[/] grafting instruct + (tuned - base) into {out}/")
    res = apply(instruct=paths["instruct"], base=paths["base"], tuned=paths["tuned"], output=out, overwrite=True)
    con.print(f"    {res.stats.grafted} tensors grafted, {res.stats.copied} copied, "
              f"{res.stats.bytes_written / 1e6:.2f} MB in {res.stats.seconds:.3f} s")
    exact, worst = _check(paths, out, res.plan.grafted)
    con.print(f"[bold]4.[/] checked every grafted element against a float64 reference rounded once: "
              f"{exact:.4%} bit-identical, worst {worst} ulp")
    con.print(f"[green]done[/]: load {out} with transformers like the instruct model it came from")
    return {"paths": paths, "output": out, "stats": res.stats, "report": report, "exact": exact, "max_ulp": worst}


def claim_workdir(root: Path) -> None:
    """Make ``root`` ready for a demo run, removing only what an earlier demo run made there.

    A missing or empty folder is used as it is; a folder holding anything
    else needs the demo's mark, and then only the folders the mark lists go.
    """
    if root.is_dir() and any(root.iterdir()):
        mark = root / MARK
        try:
            made = json.loads(mark.read_text(encoding="utf-8"))["made"] if mark.is_file() and not mark.is_symlink() else None
        except (OSError, ValueError, KeyError, TypeError):
            made = None
        if not isinstance(made, list) or not set(made) <= set(MADE):
            raise ShadowgraftError(f"{root}: holds {listed(sorted(p.name for p in root.iterdir()))} and is not an earlier demo folder (no {MARK}), so the demo "
                                   "leaves it alone; pass --workdir with a new or empty folder")
        for name in made:
            p = root / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.is_symlink() or p.exists():
                p.unlink()
    elif root.exists() and not root.is_dir():
        raise ShadowgraftError(f"{root}: is a file, not a folder; pass --workdir with a new or empty folder")
    root.mkdir(parents=True, exist_ok=True)
    # Marked before anything is made, so a run cut short can still be cleaned up by the next one.
    (root / MARK).write_text(json.dumps({"made": list(MADE)}) + "\n")


def _check(paths: dict, out: Path, grafted: list[str]) -> tuple[float, int]:
    """Fraction of grafted elements bit-identical to the float64 reference rounded once, and the worst ulp gap."""
    cks = {k: Checkpoint.open(v) for k, v in paths.items()}
    got = Checkpoint.open(out)
    same = total = worst = 0
    for name in grafted:
        i, t, b = (cks[k].view(name).double() for k in ("instruct", "tuned", "base"))
        y = got.view(name)
        want = (i + (t - b)).to(y.dtype)
        gap = (_ordered(y) - _ordered(want)).abs()
        same += int((gap == 0).sum())
        total += gap.numel()
        worst = max(worst, int(gap.max()))
    return same / max(total, 1), worst


def _ordered(x: torch.Tensor) -> torch.Tensor:
    # Float bit patterns as integers that count representable values.
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    i = x.reshape(-1).view(bits).to(torch.int64)
    return torch.where(i < 0, torch.iinfo(bits).min - i, i)
