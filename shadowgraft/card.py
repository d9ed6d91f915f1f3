"""The model card (README.md) written next to a grafted checkpoint.

Metadata follows the Hub's model-tree conventions so the result shows up
under its parents: ``base_model`` lists the inputs that are Hub repos
(instruct first) with ``base_model_relation: merge``. The body says how the
weights were made and pins every input to the commit it was read at.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from .files import regular_file

# Fields of the instruct model's card that still hold for the graft.
_INHERITED = ("license", "license_name", "license_link", "language", "pipeline_tag")
_ROLES = ("instruct", "base", "tuned", "delta", "adapter")
_SIGMA_ORDER = ("sigma_mean", "sigma_median", "sigma_max", "sigma_min", "sigma_weighted", "n_tensors")


def inherited_metadata(instruct_root: Path | None) -> dict:
    """License (and language, pipeline tag) from the instruct model's README.md, when it has YAML metadata."""
    card = None if instruct_root is None else Path(instruct_root) / "README.md"
    if card is None or not (card.exists() or card.is_symlink()):
        return {}
    # Read only a regular file of the folder: a link could point at any file
    # of this machine, and its metadata would be published with the graft.
    # (writer.side_files refuses such a README before the run; this is the last guard.)
    regular_file(card, Path(instruct_root))
    from huggingface_hub.repocard import metadata_load

    try:
        data = metadata_load(card) or {}  # ModelCard.load would print a warning for a card without metadata
    except Exception:  # unreadable or malformed front matter: nothing trustworthy to copy
        return {}
    return {k: data[k] for k in _INHERITED if isinstance(data, dict) and data.get(k)}


def card_text(record: dict, *, instruct_root: Path | None = None) -> str:
    """The README.md text (YAML metadata + body) for the graft described by ``record``."""
    # repocard_data alone imports in ~0.05 s; the full ModelCard module costs
    # ~0.2 s more and is only needed to read an instruct card's metadata.
    from huggingface_hub.repocard_data import ModelCardData

    inputs = record["inputs"]
    roles = [*_ROLES, *sorted(k for k in inputs if k.startswith("tuned_"))]  # --combine: tuned_1, tuned_2, ...
    hub_ids = list(dict.fromkeys(inputs[k]["repo_id"] for k in roles if inputs.get(k, {}).get("repo_id")))
    data = ModelCardData(
        base_model=hub_ids or None,
        base_model_relation="merge" if hub_ids else None,
        library_name="transformers",
        tags=["shadow-ft", "shadowgraft"],
        **inherited_metadata(instruct_root),
    )
    return f"---\n{data.to_yaml()}\n---\n\n" + _body(record)


def write_card(folder: Path, record: dict, *, instruct_root: Path | None = None) -> None:
    """Write ``folder/README.md`` for the graft described by ``record``."""
    (Path(folder) / "README.md").write_text(card_text(record, instruct_root=instruct_root), encoding="utf-8")


def pinned_command(record: dict) -> str:
    """The recorded command with every Hub input replaced by ``repo_id@commit``, so it reproduces exactly.

    >>> pinned_command({"command": "shadowgraft apply --instruct Qwen/X ...", "inputs": {"instruct":
    ...     {"source": "Qwen/X", "repo_id": "Qwen/X", "commit": "a" * 40}}})      # doctest: +SKIP
    'shadowgraft apply --instruct Qwen/X@aaaa... ...'
    """
    pins = {d["source"]: f"{d['repo_id']}@{d['commit']}" for d in record["inputs"].values()
            if d.get("repo_id") and d.get("commit") and d.get("source")}
    try:
        words = shlex.split(record["command"])
    except ValueError:  # unbalanced quotes: show it as it was run
        return record["command"]
    out = []
    for w in words:
        opt, eq, value = w.partition("=")
        if eq and opt.startswith("--") and value in pins:
            out.append(f"{opt}={pins[value]}")
        else:
            out.append(pins.get(w, w))
    return shlex.join(out)


def _title(inputs: dict) -> str:
    ins = inputs.get("instruct", {})
    name = ins.get("repo_id") or Path(ins.get("path") or ins.get("source") or "instruct").name
    return f"Shadow-FT graft onto {name.split('/')[-1]}"


def _body(record: dict) -> str:
    inputs = record["inputs"]
    n_graft, n_copy = len(record.get("grafted", [])), len(record.get("copied", []))
    lines = [
        f"# {_title(inputs)}",
        "",
        f"Made with shadowgraft {record.get('shadowgraft_version', '')} (Shadow-FT): the change that fine-tuning made "
        "to a base model is grafted onto its instruct sibling, tensor by tensor, in fp32, rounded once to the "
        "output dtype:",
        "",
        f"    {record['formula']}",
        "",
        "| setting | value |",
        "|---|---|",
        f"| mode | {record.get('mode', 'full')} |",
        f"| alpha | {record['alpha']} |",
        *_recipe_rows(record),
        f"| scope | {record['scope']} ({n_graft} tensors grafted, {n_copy} copied unchanged from instruct) |",
        *_adapter_rows(inputs.get("adapter")),
        "",
        "## Inputs",
        "",
        "| role | model | revision asked | commit |",
        "|---|---|---|---|",
    ]
    local = []
    for role, d in inputs.items():
        if d.get("repo_id"):
            model = f"[{d['repo_id']}](https://huggingface.co/{d['repo_id']})"
            lines.append(f"| {role} | {model} | {d.get('revision') or '(default branch)'} | `{d.get('commit') or 'unknown'}` |")
        else:
            lines.append(f"| {role} | `{d.get('source') or d.get('path')}` (local) | - | - |")
            local += [f"- {role} `{name}` header: `{sha}`" for name, sha in (d.get("header_sha256") or {}).items()]
            if d.get("sample_sha256"):
                local.append(f"- {role} sampled data: `{d['sample_sha256']}`")
    if local:
        lines += ["", "Local inputs have no commit. The sha256 of each safetensors header pins names, shapes and dtypes; "
                  "a sha256 over sampled data blocks tells apart checkpoints that share an architecture:", "", *local]
    lines += _similarity(record.get("similarity"))
    lines += _training(record.get("training"))
    notes = [f"- {w}" for w in record.get("warnings", [])]
    notes += [f"- `{name}`: {n} NaN/Inf value(s) after grafting" for name, n in (record.get("nonfinite") or {}).items()]
    if notes:
        lines += ["", "## Notes", "", *notes]
    pinned, as_run = pinned_command(record), record.get("command", "")
    lines += ["", "## Reproduce", "", "```bash", pinned, "```"]
    if pinned != pinned_command({**record, "inputs": {}}):
        lines += ["", "As it was run (Hub revisions unpinned):", "", "```bash", as_run, "```"]
    lines += ["", "`shadowgraft.json` next to the weights lists every grafted tensor and the full provenance.", ""]
    return "\n".join(lines)


def _recipe_rows(record: dict) -> list[str]:
    """Per-tensor alpha rules and how several deltas were combined, when the record has them."""
    rows = []
    rules = record.get("alpha_for") or []
    if rules:
        text = "; ".join(f"`{r['regex']}` -> {r['alpha']}" for r in rules).replace("|", "\\|")
        rows.append(f"| alpha per tensor (first matching regex wins) | {text} |")
    mix = record.get("combine")
    if mix:
        parts = [f"{k} {', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in mix.items()]
        rows.append(f"| deltas combined | {'; '.join(parts)} |")
    return rows


def _adapter_rows(ad: dict | None) -> list[str]:
    if not ad or ad.get("r") is None:
        return []
    rows = [f"| LoRA rank | {ad['r']} |", f"| LoRA alpha | {ad.get('lora_alpha')} (rsLoRA: {bool(ad.get('use_rslora'))}) |"]
    if ad.get("base_model_name_or_path"):
        rows.append(f"| adapter trained on | `{ad['base_model_name_or_path']}` |")
    return rows


def _similarity(sim) -> list[str]:
    """The relative-gap summary from ``shadowgraft stats``, when the record carries one."""
    if not isinstance(sim, dict) or not sim:
        return []
    pair = " and ".join(str(sim[k]) for k in ("a", "b") if isinstance(sim.get(k), str))
    lines = [
        "",
        "## Similarity",
        "",
        "Relative gap sigma = sum|A - B| / (sum|A| + sum|B|) per tensor, summarised over the transformer-block "
        "tensors" + (f" between {pair}" if pair else "") + ". Close siblings are under 0.03 (Llama-3.1-8B base vs "
        "instruct: about 0.016); the pairs the Shadow-FT authors graft reach about 0.1 (Qwen3-4B-Base vs "
        "Instruct-2507: 0.0562), where an alpha grid is worth trying; over 0.12 the weights diverge.",
        "",
        "| statistic | value |",
        "|---|---|",
    ]
    keys = [k for k in _SIGMA_ORDER if k in sim] + sorted(k for k in sim if k not in _SIGMA_ORDER)
    for k in keys:
        v = sim[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue  # nested detail belongs to the stats report, not the card
        lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    return lines


def _training(tr) -> list[str]:
    """How the tuned side was trained, when `shadowgraft shadow-ft` made it: data hash and hyper-parameters."""
    if not isinstance(tr, dict) or not tr:
        return []
    lines = ["", "## Training", "", "| setting | value |", "|---|---|"]
    for k in ("data", "data_sha256", "examples", "steps", "final_loss"):
        if tr.get(k) is not None:
            lines.append(f"| {k} | `{tr[k]}` |")
    for k, v in (tr.get("hyperparameters") or {}).items():
        lines.append(f"| {k} | {v} |")
    return lines


def write_delta_card(folder: Path, record: dict) -> None:
    """README.md for a delta or shadow adapter: what it is, its inputs pinned, and how to use it."""
    from huggingface_hub.repocard_data import ModelCardData

    base = record["inputs"]["base"]
    lowrank = record["kind"] == "lowrank"
    data = ModelCardData(
        base_model=base.get("repo_id"),
        base_model_relation="adapter" if lowrank and base.get("repo_id") else None,
        library_name="peft" if lowrank else None,
        tags=["shadow-ft", "shadowgraft", "lora" if lowrank else "delta"],
    )
    what = ("a PEFT LoRA adapter approximating the fine-tuning change W_tuned - W_base (scale 1: B @ A is the change)"
            if lowrank else "the fine-tuning change D = W_tuned - W_base, tensor by tensor")
    use = ("shadowgraft apply --instruct INSTRUCT --adapter THIS_FOLDER --output OUT" if lowrank
           else "shadowgraft apply --instruct INSTRUCT --delta THIS_FOLDER --output OUT")
    lines = [f"# Shadow-FT {'shadow adapter' if lowrank else 'delta'}", "", f"Made with shadowgraft: {what}.", "",
             "| input | source | revision |", "|---|---|---|"]
    for label, d in record["inputs"].items():
        lines.append(f"| {label} | `{d.get('repo_id') or d.get('path') or d.get('source')}` | `{d.get('commit') or '-'}` |")
    if lowrank:
        s = record["summary"]
        lines += ["", f"{s['modules']} modules, ranks {s['rank_min']}..{s['rank_max']}; the adapter keeps "
                  f"{100 * s['energy_total']:.2f}% of the change's energy (relative Frobenius error {s['rel_error_total']:.4f}); "
                  f"{s['dropped']} tensor(s) that are not matrices were left out."]
    lines += ["", "Graft it onto an instruct sibling of the base model:", "", f"    {use}", "",
              "Reproduce with:", "", f"    {pinned_command(record)}", ""]
    (Path(folder) / "README.md").write_text(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n", encoding="utf-8")
