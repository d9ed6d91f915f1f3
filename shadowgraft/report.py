"""The result of ``stats``: typed rows, JSON / CSV export, rich tables and a plot.

Non-finite numbers (a NaN from NaN inputs, an ``inf`` ratio against an
all-zero tensor) are written as ``null`` in JSON, which has no NaN or Inf.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .metrics import DeltaSums, Sums


@dataclass(frozen=True)
class TensorRow:
    """One compared tensor (``shape`` is the compared part; ``partial`` when a resized tensor was cut to its overlap)."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "BF16", or "BF16/F32" when A and B differ
    layer: int | None
    module: str
    family: str
    partial: bool
    sums: Sums = field(repr=False)
    delta: DeltaSums | None = field(default=None, repr=False)
    tower: str = "language"  # naming.tower: language, vision, projector or audio

    numel = property(lambda self: self.sums.numel)
    sigma = property(lambda self: self.sums.sigma)
    rel_l2 = property(lambda self: self.sums.rel_l2)
    cosine = property(lambda self: self.sums.cosine)
    max_abs = property(lambda self: self.sums.max_abs)
    identical = property(lambda self: self.sums.identical)

    def to_dict(self, tuned: bool = False) -> dict[str, Any]:
        s = self.sums
        d = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "numel": self.numel, "tower": self.tower,
             "layer": self.layer, "module": self.module, "family": self.family, "sigma": self.sigma, "rel_l2": self.rel_l2,
             "cosine": self.cosine, "max_abs": self.max_abs, "identical": self.identical, "nan_a": s.nan_a,
             "inf_a": s.inf_a, "nan_b": s.nan_b, "inf_b": s.inf_b, "partial": self.partial}
        if tuned:
            d["delta_ratio"] = self.delta.ratio if self.delta else None
            d["delta_cosine"] = self.delta.cosine if self.delta else None
        return d


@dataclass(frozen=True)
class Group:
    """Aggregate of the tensors of one layer (``key`` an int, ``tower`` its tower) or one module kind (``key`` a str).

    ``sigma_mean`` is the unweighted mean of the tensors' sigma; ``rel_l2``,
    ``cosine``, ``identical`` and the delta figures treat the group's tensors
    as one long vector.
    """

    key: int | str
    family: str | None
    n_tensors: int
    numel: int
    sigma_mean: float
    sigma_max: float
    sigma_weighted: float
    rel_l2: float
    cosine: float
    identical: float
    delta_ratio: float | None = None
    delta_cosine: float | None = None
    tower: str | None = None  # layers only

    def to_dict(self, label: str, tuned: bool = False) -> dict[str, Any]:
        d = {label: self.key}
        if self.tower is not None:
            d["tower"] = self.tower
        if self.family is not None:
            d["family"] = self.family
        d.update(n_tensors=self.n_tensors, numel=self.numel, sigma_mean=self.sigma_mean, sigma_max=self.sigma_max,
                 sigma_weighted=self.sigma_weighted, rel_l2=self.rel_l2, cosine=self.cosine, identical=self.identical)
        if tuned:
            d.update(delta_ratio=self.delta_ratio, delta_cosine=self.delta_cosine)
        return d


@dataclass(frozen=True)
class Summary:
    """Sigma statistics over block tensors (``basis="block"``), as the paper reports them.

    ``sigma_mean`` is the official number: the unweighted mean over tensors
    inside the language model's transformer blocks (any tower's blocks when
    there is no language model); ``sigma_weighted`` weighs each by its
    element count. ``basis`` is ``"all"`` for a model with no block names.
    ``towers`` holds the same figures per tower (``{"vision": {"sigma_mean":
    ...}}``), each over that tower's blocks.
    """

    sigma_mean: float
    sigma_median: float
    sigma_max: float
    sigma_min: float
    sigma_weighted: float
    n_tensors: int  # tensors in the statistics (finite sigma)
    basis: str
    n_compared: int  # every compared tensor, blocks or not
    numel: int
    rel_l2: float
    cosine: float
    identical: float
    n_nonfinite: int  # tensors with NaN/Inf in A or B
    threshold: float
    graftable: bool
    verdict: str
    delta_ratio: float | None = None  # ||T-A|| / ||B-A|| over the basis tensors
    delta_cosine: float | None = None
    close: float = 0.03  # under it: close siblings (the default of ``summary.CLOSE``)
    band: str = "unknown"  # close | graftable | divergent | unknown
    towers: dict[str, dict] = field(default_factory=dict)

    def with_verdict(self, text: str) -> "Summary":
        return replace(self, verdict=text)

    def to_dict(self, tuned: bool = False) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        if not tuned:
            d.pop("delta_ratio"), d.pop("delta_cosine")
        return d


@dataclass(frozen=True)
class Mismatch:
    """A tensor in both checkpoints with different shape or dtype; ``compared`` says what was compared."""

    name: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    dtype_a: str
    dtype_b: str
    compared: str  # "all", "first N rows" or "none"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape_a": list(self.shape_a), "shape_b": list(self.shape_b),
                "dtype_a": self.dtype_a, "dtype_b": self.dtype_b, "compared": self.compared}


@dataclass(frozen=True)
class Report:
    """Everything ``stats`` measured.

    >>> r = shadowgraft.stats("./base", "./instruct")      # doctest: +SKIP
    >>> r.summary.sigma_mean, r.layers[0].sigma_mean      # doctest: +SKIP
    """

    a: str
    b: str
    tuned: str | None
    summary: Summary
    tensors: list[TensorRow]
    layers: list[Group]
    modules: list[Group]
    only_in_a: list[str]
    only_in_b: list[str]
    mismatched: list[Mismatch]
    skipped: list[str] = field(default_factory=list)
    tuned_missing: list[str] = field(default_factory=list)
    seconds: float = 0.0
    bytes_read: int = 0
    fp8_scales: list[str] = field(default_factory=list)  # FP8 block scales: compared through their weights, not as tensors
    renamed: dict[str, dict[str, str]] = field(default_factory=dict)  # "a"/"b"/"tuned" -> prefix rule (prefix.Rename)

    # -- export -------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain data with the keys of the JSON schema; floats may be NaN or inf here."""
        t = self.tuned is not None
        return {
            "a": self.a, "b": self.b, "tuned": self.tuned,
            "summary": self.summary.to_dict(t),
            "tensors": [r.to_dict(t) for r in self.tensors],
            "layers": [g.to_dict("layer", t) for g in self.layers],
            "modules": [g.to_dict("module", t) for g in self.modules],
            "only_in_a": list(self.only_in_a), "only_in_b": list(self.only_in_b),
            "mismatched": [m.to_dict() for m in self.mismatched],
            "skipped": list(self.skipped), "tuned_missing": list(self.tuned_missing),
            "fp8_scales": list(self.fp8_scales),
            "seconds": self.seconds, "bytes_read": self.bytes_read, "renamed": dict(self.renamed),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The report as one JSON object (NaN and inf become null)."""
        return json.dumps(_json_safe(self.to_dict()), indent=indent, allow_nan=False)

    def to_csv(self) -> str:
        """One row per compared tensor, with the columns of ``tensors`` in the JSON, then one row per
        tensor only one checkpoint has: its name, ``only_in`` A or B (the last column), nothing else."""
        t = self.tuned is not None
        rows = [r.to_dict(t) for r in self.tensors]
        buf = io.StringIO()
        cols = (list(rows[0]) if rows else ["name"]) + ["only_in"]
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", restval="")
        w.writeheader()
        for r in rows:
            r["shape"] = "x".join(map(str, r["shape"]))
            r["layer"] = "" if r["layer"] is None else r["layer"]
            w.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in r.items()})
        for side, names in (("A", self.only_in_a), ("B", self.only_in_b)):
            for n in names:
                w.writerow({"name": n, "only_in": side})
        return buf.getvalue()

    # -- terminal -----------------------------------------------------------

    def print(self, console=None, *, by: str = "layer", top: int = 10) -> None:
        """Rich tables: summary, then per layer / module / tensor, the ``top`` most different tensors, the verdict."""
        _print(self, console, by=by, top=top)

    def nonfinite_note(self) -> str | None:
        """The line naming the tensors with NaN/Inf (rich markup), printed even by ``stats --quiet``."""
        if not self.summary.n_nonfinite:
            return None
        from .display import shown

        bad = [x.name for x in self.tensors if x.sums.nonfinite]
        return f"[yellow]NaN/Inf values[/] in {self.summary.n_nonfinite} tensor(s): {shown(_names(bad))}"

    def plot(self, path: str | Path) -> Path:
        """Sigma per layer, one line per module kind (and the T-A vs B-A figures with a tuned model); PNG or SVG."""
        from .plot import plot

        return plot(self, Path(path))


def _json_safe(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


# -- rendering ------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _bar(x: float, top: float, width: int = 20) -> str:
    if not (math.isfinite(x) and top > 0):
        return ""
    return "#" * max(0, round(width * x / top))


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _print(r: Report, console, *, by: str, top: int) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from .display import cell, fmt, shown

    if by not in ("layer", "module", "tensor"):
        raise ValueError(f"by must be layer, module or tensor, not {by!r}")
    # Names come from the files: every one goes through shown / cell, and a
    # console made here never renders emoji codes (a caller's own console may,
    # which is why names in tables are Text cells).
    con = console or Console(emoji=False, highlight=False)
    s, tuned = r.summary, r.tuned is not None

    def table(title: str, cols: list[str], left: tuple[str, ...] = (), wrap: str = "") -> Table:
        # Numbers never wrap; only the one text column (``wrap``) gives way on narrow terminals.
        t = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1), title_justify="left")
        for c in cols:
            t.add_column(c, justify="left" if c in left else "right", no_wrap=c != wrap,
                         overflow="fold" if c == wrap else "ellipsis")
        return t

    con.print(f"[bold]{shown(r.a)}[/] vs [bold]{shown(r.b)}[/]" + (f", tuned [bold]{shown(r.tuned)}[/]" if tuned else "")
              + f": {s.n_compared} tensors compared, {_size(r.bytes_read)} read in {r.seconds:.2f} s", emoji=False)
    many = len(s.towers) > 1
    what = f"{s.n_tensors} transformer-block tensors" if s.basis == "block" else f"all {s.n_tensors} tensors (no blocks found)"
    if many and s.basis == "block" and "language" in s.towers and s.towers["language"]["basis"] == "block":
        what = f"the language model's {s.n_tensors} block tensors"
    t = table("summary", ["", "value", "note"], left=("", "note"), wrap="note")
    t.add_row("sigma_mean", f"[bold]{fmt(s.sigma_mean)}[/]", f"the paper's number: mean over {what}")
    for name, v in s.towers.items() if many else ():
        kind = "block tensors" if v["basis"] == "block" else "tensors (it has no blocks)"
        t.add_row(f"sigma_mean {name}", fmt(v["sigma_mean"]), f"mean over the {name} tower's {v['n_tensors']} {kind}")
    t.add_row("median / min / max", f"{fmt(s.sigma_median)} / {fmt(s.sigma_min)} / {fmt(s.sigma_max)}", "")
    t.add_row("sigma_weighted", fmt(s.sigma_weighted), "weighted by element count")
    t.add_row("rel_l2 / cosine", f"{fmt(s.rel_l2)} / {fmt(s.cosine, 6)}", "")
    t.add_row("identical", _pct(s.identical), "elements with A == B")
    if tuned:
        t.add_row("|T-A| / |B-A|", fmt(s.delta_ratio), "fine-tuning change vs instruct change")
        t.add_row("cos(T-A, B-A)", fmt(s.delta_cosine), "> 0 along the instruct change, ~0 across")
    con.print(t)
    delta_cols = ["T-A/B-A", "cos(dT,dB)"] if tuned else []
    if by == "layer" and not r.layers:
        by = "module"  # no transformer blocks: the module view is the next best
    if by in ("layer", "module"):
        groups = r.layers if by == "layer" else r.modules
        towered = by == "layer" and len({g.tower for g in groups}) > 1  # vision block 0 is not text layer 0
        t = table(f"per {by}", ["tower"] * towered + [by, "sigma", "max", "rel_l2", "cosine", "same"] + delta_cols
                  + ([] if tuned else [""]), left=("tower", by, ""))
        hi = max((g.sigma_mean for g in groups if math.isfinite(g.sigma_mean)), default=0.0)
        for g in groups:
            row = [str(g.tower)] * towered + [cell(g.key), fmt(g.sigma_mean), fmt(g.sigma_max), fmt(g.rel_l2), fmt(g.cosine, 6),
                                              _pct(g.identical)]
            row += [fmt(g.delta_ratio), fmt(g.delta_cosine)] if tuned else []
            style = "red" if math.isfinite(g.sigma_mean) and g.sigma_mean >= s.threshold else None
            t.add_row(*row, *([] if tuned else [_bar(g.sigma_mean, hi, 12)]), style=style)
        con.print(t)
    rows = sorted(r.tensors, key=lambda x: -x.sigma if math.isfinite(x.sigma) else -math.inf)
    if top > 0 or by == "tensor":
        listed = rows if top <= 0 else rows[:top]
        title = "tensors by sigma" if len(listed) == len(rows) else f"top {len(listed)} of {len(rows)} tensors by sigma"
        # Names run to ~45 characters: on narrow terminals keep only the telling columns.
        extra = ["rel_l2", "max|A-B|", "same"] if con.width >= 110 else ([] if tuned else ["rel_l2", "same"])
        t = table(title, ["tensor", "sigma", "cosine"] + extra + delta_cols, left=("tensor",), wrap="tensor")
        for x in listed:
            row = [cell(x.name + (" (overlap)" if x.partial else "")), fmt(x.sigma), fmt(x.cosine, 6)]
            cells = {"rel_l2": fmt(x.rel_l2), "max|A-B|": fmt(x.max_abs), "same": _pct(x.identical)}
            row += [cells[c] for c in extra]
            if tuned:
                row += [fmt(x.delta.ratio), fmt(x.delta.cosine)] if x.delta else ["-", "-"]
            t.add_row(*row)
        con.print(t)
    for label, names in (("only in A", r.only_in_a), ("only in B", r.only_in_b),
                         ("skipped, dtype not F64/F32/F16/BF16", r.skipped),
                         ("FP8 block scales, compared through their weights (dequantized)", r.fp8_scales),
                         ("missing or reshaped in tuned, no delta figures", r.tuned_missing)):
        if names:
            con.print(f"[yellow]{label}[/] ({len(names)}): {shown(_names(names))}", emoji=False)
    for label, rule in r.renamed.items():
        who = {"a": "A", "b": "B"}.get(label, label)
        con.print(f"[yellow]renamed[/]: {who}'s tensor names compared under prefix change "
                  f"{shown(repr(rule['from']))} -> {shown(repr(rule['to']))}", emoji=False)
    for m in r.mismatched:
        con.print(f"[yellow]mismatched[/] {shown(m.name)}: A {_shape(m.shape_a)} {m.dtype_a} vs B {_shape(m.shape_b)} {m.dtype_b}; "
                  f"compared: {m.compared}", emoji=False)
    if s.n_nonfinite:
        con.print(r.nonfinite_note(), emoji=False)
    color = {"close": "green", "graftable": "yellow"}.get(s.band, "red")
    con.print(f"[bold {color}]verdict[/]: {shown(s.verdict)}", emoji=False)


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _names(names: list[str], k: int = 4) -> str:
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")
