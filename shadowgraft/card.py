"""The model card (README.md) written next to a grafted checkpoint."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData


def _license(instruct_root: Path | None) -> str | None:
    if instruct_root is None or not (instruct_root / "README.md").is_file():
        return None
    try:
        return ModelCard.load(instruct_root / "README.md").data.to_dict().get("license")
    except Exception:  # a card without YAML front matter has no license to copy
        return None


def build_card(record: dict, *, instruct_root: Path | None = None) -> ModelCard:
    """A ModelCard whose metadata names the instruct model as ``base_model`` with relation ``merge``."""
    inputs = record["inputs"]
    hub_ids = [inputs[k]["repo_id"] for k in ("instruct", "base", "tuned") if k in inputs and inputs[k].get("repo_id")]
    data = ModelCardData(
        base_model=hub_ids or None,
        base_model_relation="merge" if hub_ids else None,
        library_name="transformers",
        license=_license(instruct_root),
        tags=["shadow-ft", "shadowgraft"],
    )
    lines = [
        "# Shadow-FT graft",
        "",
        "Made with [shadowgraft](https://github.com/) by grafting a fine-tuning delta onto an instruct model:",
        "",
        f"    {record['formula']}      (alpha = {record['alpha']}, scope = {record['scope']})",
        "",
        "| input | source | revision |",
        "|---|---|---|",
    ]
    for label, d in inputs.items():
        lines.append(f"| {label} | `{d.get('repo_id') or d.get('path') or d.get('source')}` | `{d.get('commit') or '-'}` |")
    lines += [
        "",
        f"{len(record['grafted'])} tensors grafted, {len(record['copied'])} copied from instruct unchanged.",
        "",
        "Reproduce with:",
        "",
        f"    {record['command']}",
        "",
    ]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
    return ModelCard(content)


def write_card(folder: Path, record: dict, *, instruct_root: Path | None = None) -> None:
    build_card(record, instruct_root=instruct_root).save(folder / "README.md")
