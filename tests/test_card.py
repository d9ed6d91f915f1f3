"""The model card written by ``apply``, read back with huggingface_hub's own parser."""

from __future__ import annotations

import json
import shlex

import pytest
from huggingface_hub import ModelCard

import shadowgraft
from shadowgraft import Checkpoint, ShadowgraftError
from shadowgraft.card import card_text, inherited_metadata, pinned_command, write_card
from shadowgraft.synthetic import Shape, make_trio

from .conftest import run_cli
from .test_hub import to_cache

IDS = {"instruct": "Qwen/Qwen3-4B-Instruct-2507", "base": "Qwen/Qwen3-4B-Base", "tuned": "me/qwen3-4b-base-math"}
COMMITS = {"instruct": "1" * 40, "base": "2" * 40, "tuned": "3" * 40}


@pytest.fixture
def trio(tmp_path):
    return make_trio(tmp_path / "local", shape=Shape(layers=2, hidden=64, intermediate=96, vocab=128), shard_bytes=60_000)


def cache_trio(tmp_path, monkeypatch, trio):
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for role, repo_id in IDS.items():
        to_cache(cache, repo_id, trio[role], COMMITS[role], refs=("main", "v1"))


def test_card_from_hub_inputs_round_trips(tmp_path, monkeypatch, trio):
    (trio["instruct"] / "README.md").write_text(
        "---\nlicense: apache-2.0\nlanguage:\n- en\npipeline_tag: text-generation\ntags:\n- chat\n---\n# Instruct\n")
    cache_trio(tmp_path, monkeypatch, trio)
    command = (f"shadowgraft apply --instruct {IDS['instruct']} --base {IDS['base']}@v1 --tuned={IDS['tuned']} "
               f"--output '{tmp_path}/my out' --alpha 0.5")
    shadowgraft.apply(instruct=IDS["instruct"], base=f"{IDS['base']}@v1", tuned=IDS["tuned"], output=tmp_path / "my out",
                      alpha=0.5, command=command)
    card = ModelCard.load(str(tmp_path / "my out" / "README.md"))
    meta = card.data.to_dict()
    assert meta["base_model"] == list(IDS.values())
    assert meta["base_model_relation"] == "merge"
    assert meta["library_name"] == "transformers"
    assert meta["tags"] == ["shadow-ft", "shadowgraft"]
    assert (meta["license"], meta["language"], meta["pipeline_tag"]) == ("apache-2.0", ["en"], "text-generation")
    body = card.text
    assert "W_out = W_instruct + alpha * (W_tuned - W_base)" in body
    assert "| alpha | 0.5 |" in body and "| scope | linear (14 tensors grafted, 7 copied unchanged from instruct) |" in body
    for role, repo_id in IDS.items():
        revision = "v1" if role == "base" else "(default branch)"
        assert f"| {role} | [{repo_id}](https://huggingface.co/{repo_id}) | {revision} | `{COMMITS[role]}` |" in body
    pinned = (f"shadowgraft apply --instruct {IDS['instruct']}@{COMMITS['instruct']} --base {IDS['base']}@{COMMITS['base']} "
              f"--tuned={IDS['tuned']}@{COMMITS['tuned']} --output '{tmp_path}/my out' --alpha 0.5")
    assert f"```bash\n{pinned}\n```" in body
    assert f"```bash\n{shlex.join(shlex.split(command))}\n```" in body
    assert "https://github.com/" not in body
    assert json.loads((tmp_path / "my out" / "shadowgraft.json").read_text())["command"] == command


def test_card_from_local_inputs_lists_header_hashes(tmp_path, trio):
    shadowgraft.apply(instruct=trio["instruct"], base=trio["base"], tuned=trio["tuned"], output=tmp_path / "out",
                      command="shadowgraft apply ...")
    card = ModelCard.load(str(tmp_path / "out" / "README.md"))
    meta = card.data.to_dict()
    assert "base_model" not in meta and "base_model_relation" not in meta and "license" not in meta
    assert meta["tags"] == ["shadow-ft", "shadowgraft"]
    for role in ("instruct", "base", "tuned"):
        assert f"| {role} | `{trio[role]}` (local) | - | - |" in card.text
        with Checkpoint.open(trio[role]) as ck:
            hashes, sample = ck.header_hashes(), ck.sample_hash()
        assert len(hashes) > 1
        for name, sha in hashes.items():
            assert f"- {role} `{name}` header: `{sha}`" in card.text
        assert f"- {role} sampled data: `{sample}`" in card.text
    # Nothing to pin, so the command is shown once.
    assert card.text.count("```bash") == 1


def test_mixed_inputs_name_only_hub_ids(tmp_path, monkeypatch, trio):
    cache_trio(tmp_path, monkeypatch, trio)
    shadowgraft.apply(instruct=trio["instruct"], base=IDS["base"], tuned=trio["tuned"], output=tmp_path / "out")
    meta = ModelCard.load(str(tmp_path / "out" / "README.md")).data.to_dict()
    assert meta["base_model"] == [IDS["base"]] and meta["base_model_relation"] == "merge"


def record(**extra) -> dict:
    base = {
        "shadowgraft_version": "0.1.0", "formula": "W_out = W_instruct + alpha * (W_tuned - W_base)", "mode": "full",
        "inputs": {"instruct": {"source": "org/i", "repo_id": "org/i", "revision": None, "commit": "c" * 40},
                   "base": {"source": "./b", "path": "/x/b", "header_sha256": {"model.safetensors": "d" * 64}},
                   "tuned": {"source": "./t", "path": "/x/t", "header_sha256": {"model.safetensors": "e" * 64}}},
        "alpha": 1.0, "scope": "linear", "command": "shadowgraft apply --instruct org/i --base ./b --tuned ./t -o o",
        "grafted": ["a", "b"], "copied": ["c"], "warnings": [], "nonfinite": {},
    }
    return {**base, **extra}


@pytest.mark.parametrize("readme, want", [
    ("---\nlicense: other\nlicense_name: llama3\nlicense_link: https://llama.meta.com/llama3/license\n---\nhi\n",
     {"license": "other", "license_name": "llama3", "license_link": "https://llama.meta.com/llama3/license"}),
    ("# no front matter at all\n", {}),
    ("---\nlicense: [unclosed\n---\n", {}),
])
def test_license_is_copied_from_the_instruct_card(tmp_path, readme, want):
    (tmp_path / "README.md").write_text(readme)
    write_card(tmp_path, record(), instruct_root=tmp_path)  # overwrites the source card: it was read first
    meta = ModelCard.load(str(tmp_path / "README.md")).data.to_dict()
    assert {k: meta[k] for k in ("license", "license_name", "license_link") if k in meta} == want


def test_similarity_summary_is_rendered_when_present():
    sim = {"a": "org/b", "b": "org/i", "sigma_max": 0.0412, "sigma_mean": 0.01623, "n_tensors": 196,
           "sigma_median": 0.0158, "layers": [{"layer": 0}]}
    text = ModelCard(card_text(record(similarity=sim))).text
    assert "between org/b and org/i" in text
    table = text.split("| statistic | value |\n|---|---|\n")[1].split("\n\n")[0].splitlines()
    assert table == ["| sigma_mean | 0.01623 |", "| sigma_median | 0.0158 |", "| sigma_max | 0.0412 |", "| n_tensors | 196 |"]
    assert "## Similarity" not in ModelCard(card_text(record())).text


def test_warnings_nonfinite_and_adapter_rows():
    rec = record(warnings=["tensor x kept"], nonfinite={"model.layers.0.mlp.up_proj.weight": 3}, mode="adapter")
    rec["inputs"]["adapter"] = {"source": "me/lora", "repo_id": "me/lora", "revision": "v2", "commit": "f" * 40,
                                "r": 8, "lora_alpha": 16, "use_rslora": False, "base_model_name_or_path": "org/b"}
    card = ModelCard(card_text(rec))
    assert card.data.to_dict()["base_model"] == ["org/i", "me/lora"]
    assert "- tensor x kept" in card.text and "- `model.layers.0.mlp.up_proj.weight`: 3 NaN/Inf value(s)" in card.text
    assert "| LoRA rank | 8 |" in card.text and "| LoRA alpha | 16 (rsLoRA: False) |" in card.text
    assert "| adapter | [me/lora](https://huggingface.co/me/lora) | v2 | `" + "f" * 40 + "` |" in card.text


def test_pinned_command():
    rec = record(command="shadowgraft apply --instruct=org/i --base ./b --tuned org/i --output 'a b'")
    assert pinned_command(rec) == (f"shadowgraft apply --instruct=org/i@{'c' * 40} --base ./b --tuned org/i@{'c' * 40} "
                                   "--output 'a b'")
    # Unparseable quoting is shown as it was run.
    assert pinned_command(record(command="shadowgraft apply --output 'a")) == "shadowgraft apply --output 'a"


def test_a_card_without_metadata_is_read_without_a_warning(tmp_path, capfd):
    (tmp_path / "README.md").write_text("# no front matter at all\n")
    assert inherited_metadata(tmp_path) == {}
    assert capfd.readouterr().err == ""


def test_an_instruct_readme_linking_out_of_the_folder_refuses_the_graft(trio, tmp_path, capsys):
    """Its metadata would go into the output's card: a link could publish any file's license lines."""
    secret = tmp_path / "secret.md"
    secret.write_text("---\nlicense: other\nlicense_name: hunter2\n---\n")
    (trio["instruct"] / "README.md").symlink_to(secret)
    code, out, err = run_cli(capsys, "apply", "--instruct", trio["instruct"], "--base", trio["base"],
                             "--tuned", trio["tuned"], "-o", tmp_path / "out")
    assert code == 1
    assert f"error: {trio['instruct'] / 'README.md'}: is a link pointing outside the checkpoint folder" in " ".join(err.split())
    assert not (tmp_path / "out").exists()
    with pytest.raises(ShadowgraftError, match="is a link pointing outside the checkpoint folder"):
        inherited_metadata(trio["instruct"])
