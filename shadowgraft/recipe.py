"""The graft's knobs as a user gives them: alpha grids, per-tensor alpha rules, how deltas combine,
which tuned checkpoints, and the command line that reproduces a run.

Each parser turns text or Python values into checked values or raises one
``ShadowgraftError`` line; the CLI's option callbacks call the same
functions, so a rule lives once and bad values are usage errors there.
"""

from __future__ import annotations

import glob
import math
import os
import re
import shlex
from decimal import Decimal
from pathlib import Path
from typing import Sequence

from .errors import ShadowgraftError
from .mix import METHODS, Mix


def cli_line(*, include: Sequence[str], exclude: Sequence[str], tuned, alpha: tuple[float, ...],
             alpha_for: tuple[tuple[str, float], ...], mix: Mix | None, scope: str, dtype: str, max_shard_size,
             **paths) -> str:
    """The ``shadowgraft apply`` command line equivalent to these arguments."""
    words = ["shadowgraft", "apply"]
    for flag in ("instruct", "base", "delta", "adapter"):
        if paths[flag] is not None:
            words += [f"--{flag}", os.fspath(paths[flag])]
    for t in (tuned if isinstance(tuned, (list, tuple)) else [tuned] if tuned is not None else []):
        words += ["--tuned", os.fspath(t)]
    words += ["--output", os.fspath(paths["output"])]
    if alpha != (1.0,):
        words += ["--alpha", ",".join(map(repr, alpha))]
    for pattern, value in alpha_for:
        words += ["--alpha-for", f"{pattern}={value!r}"]
    if mix is not None:
        if len(mix.weights) > 1:
            words += ["--combine", mix.method]
        if any(w != 1.0 for w in mix.weights):
            words += ["--weights", ",".join(map(repr, mix.weights))]
        if mix.dare is not None:
            words += ["--sparsify", "dare", "--density", repr(mix.dare), "--seed", str(mix.seed)]
        elif mix.density != 1.0:
            words += ["--density", repr(mix.density)]
    if scope != "linear":
        words += ["--scope", scope]
    for flag, values in (("--include", include), ("--exclude", exclude)):
        for v in values:
            words += [flag, v]
    if dtype != "auto":
        words += ["--dtype", dtype]
    if max_shard_size is not None:
        words += ["--max-shard-size", str(max_shard_size)]
    return shlex.join(words)


def parse_floats(text: str | float | Sequence[float], flag: str) -> tuple[float, ...]:
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(",")]
        try:
            values = tuple(float(p) for p in parts)
        except ValueError:
            raise ShadowgraftError(f"{flag} '{text}': give numbers separated by commas, e.g. 0.25,0.5,1.0") from None
        for p, v in zip(parts, values):
            if v == 0 and Decimal(p) != 0:  # 1e-400: below every float, it would silently be 0
                raise ShadowgraftError(f"{flag} '{p}' is too small to be told from 0 in floating point; give 0 or a larger value")
    elif isinstance(text, (int, float)):
        values = (float(text),)
    else:
        values = tuple(float(v) for v in text)
    if not values or not all(math.isfinite(v) for v in values):
        raise ShadowgraftError(f"{flag} must be finite numbers, got {text}")
    return values


def parse_alphas(alpha: str | float | Sequence[float]) -> tuple[float, ...]:
    """``0.5`` -> ``(0.5,)``; ``"0.25,0.5,1.0"`` or a list -> a grid, one output per value."""
    values = parse_floats(alpha, "--alpha")
    if len(set(values)) != len(values):
        raise ShadowgraftError(f"--alpha {','.join(map(repr, values))}: a value is repeated, so two outputs would collide")
    return values


def parse_alpha_for(rules: Sequence[str | tuple[str, float]]) -> tuple[tuple[str, float], ...]:
    """``["mlp=0.5"]`` -> ``(("mlp", 0.5),)``: the regex is everything before the last ``=``."""
    out = []
    for rule in rules:
        if isinstance(rule, str):
            pattern, eq, value = rule.rpartition("=")
            if not eq or not pattern:
                raise ShadowgraftError(f"--alpha-for '{rule}': write REGEX=VALUE, e.g. 'mlp\\.=0.5'")
            rule = (pattern, value)
        pattern, value = rule
        try:
            re.compile(pattern)
        except re.error as e:
            raise ShadowgraftError(f"--alpha-for '{pattern}' is not a valid regular expression: {e}") from None
        (v,) = parse_floats(str(value), f"--alpha-for '{pattern}'")
        out.append((pattern, v))
    return tuple(out)


def parse_mix(*, combine: str | None, weights, density: float | None, sparsify: str | None, seed: int,
              n_tuned: int) -> Mix | None:
    """How the change of one output is made from several deltas (or one, sparsified); None for a plain graft."""
    if combine is None and sparsify is None:
        if weights is not None or density is not None:
            raise ShadowgraftError("--weights and --density take effect with --combine or --sparsify")
        return None
    if combine is not None and combine not in METHODS:
        raise ShadowgraftError(f"--combine '{combine}': use one of {', '.join(METHODS)}")
    if sparsify is not None and sparsify != "dare":
        raise ShadowgraftError(f"--sparsify '{sparsify}': the one method is dare")
    if combine is not None and n_tuned < 2:
        raise ShadowgraftError("--combine merges several deltas: give two or more --tuned (all tuned from --base)")
    n = max(n_tuned, 1)
    w = parse_floats(weights, "--weights") if weights is not None else (1.0,) * n
    if len(w) != n:
        raise ShadowgraftError(f"--weights has {len(w)} value(s) for {n} --tuned checkpoint(s); give one per --tuned, in order")
    if combine == "ties" and min(w) <= 0:
        raise ShadowgraftError("--combine ties needs positive --weights (they weigh a vote and an average)")
    if density is not None and not (math.isfinite(density) and 0 < density <= 1):
        raise ShadowgraftError(f"--density must be in (0, 1], got {density}")
    if sparsify == "dare" and density is None:
        raise ShadowgraftError("--sparsify dare needs --density P, the probability of keeping each element")
    dare = density if sparsify == "dare" else None
    return Mix(combine or "sum", w, density if density is not None and dare is None else 1.0, dare, int(seed))


def expand_tuned(tuned) -> list:
    """One tuned spec, several, a quoted glob (``run/checkpoint-*``) or a run folder of ``checkpoint-N`` folders."""
    specs = list(tuned) if isinstance(tuned, (list, tuple)) else [tuned]
    out: list = []
    for spec in specs:
        text = os.fspath(spec)
        if any(c in text for c in "*?["):
            found = sorted(glob.glob(os.path.expanduser(text)), key=_natural)
            if not found:
                raise FileNotFoundError(f"{text}: no checkpoint matches this pattern")
            out += found
        elif Path(text).is_dir() and not any(Path(text).glob("*.safetensors")) and any(Path(text).glob("checkpoint-*")):
            out += sorted((str(p) for p in Path(text).glob("checkpoint-*") if p.is_dir()), key=_natural)
        else:
            out.append(spec)
    names = [Path(os.fspath(s)).name for s in out]
    if len(out) > 1 and len(set(names)) != len(names):
        raise ShadowgraftError("several tuned checkpoints share a folder name, so their outputs would collide; rename them")
    return out


def _natural(text: str) -> list:
    # checkpoint-100 sorts after checkpoint-20
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]
