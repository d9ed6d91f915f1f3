"""Hub ids as inputs, from a pre-built Hugging Face cache, offline (``push``: test_publish.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects

import shadowgraft
from shadowgraft import Checkpoint, ShadowgraftError, hub
from shadowgraft.cli import main
from shadowgraft.synthetic import Shape, make_trio

COMMIT_A = "a1" * 20
COMMIT_B = "b2" * 20
IDS = {"instruct": "org/instruct", "base": "org/base", "tuned": "me/tuned"}


def to_cache(cache: Path, repo_id: str, folder: Path, commit: str, *, refs=("main",)) -> Path:
    """Lay ``folder`` out as huggingface_hub does: content-addressed blobs, a snapshot of relative symlinks, refs."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(Path(folder).iterdir()):
        data = f.read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snap / f.name).symlink_to(Path("../../blobs") / blob)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty Hub cache that huggingface_hub must find through the environment, offline."""
    c = tmp_path / "hf-cache"
    c.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(c))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return c


@pytest.fixture
def hub_trio(tmp_path, cache):
    """A sharded trio both as local folders and as cached Hub repos."""
    trio = make_trio(tmp_path / "local", shape=Shape(layers=2, hidden=64, intermediate=96, vocab=128), shard_bytes=60_000)
    assert len(list(trio["instruct"].glob("*.safetensors"))) > 1
    for i, (role, repo_id) in enumerate(IDS.items()):
        to_cache(cache, repo_id, trio[role], f"{i:x}" * 40)
    return trio


def run_cli(args, capsys) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


# -- resolving ------------------------------------------------------------------


def test_resolve_reads_the_cache_at_call_time(hub_trio, cache):
    res = hub.resolve("org/instruct")
    assert res == hub.Resolved(cache / "models--org--instruct" / "snapshots" / ("0" * 40), "org/instruct", None, "0" * 40)
    # Shards are symlinks into blobs/, as in a real cache; the reader accepts them.
    assert all(p.is_symlink() and p.resolve().parent.name == "blobs" for p in res.path.glob("*.safetensors"))
    with Checkpoint.open("org/instruct") as ck, Checkpoint.open(hub_trio["instruct"]) as local:
        assert (ck.repo_id, ck.revision, ck.commit) == ("org/instruct", None, "0" * 40)
        assert ck.header_hashes() == local.header_hashes()


def test_hf_home_is_honoured_when_hf_hub_cache_is_unset(tmp_path, monkeypatch):
    home = tmp_path / "home"
    trio = make_trio(tmp_path / "local", shape=Shape(layers=1))
    to_cache(home / "hub", "org/m", trio["base"], COMMIT_A)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve("org/m").path == home / "hub" / "models--org--m" / "snapshots" / COMMIT_A


def test_apply_on_hub_ids_is_byte_identical_to_local_folders(tmp_path, hub_trio):
    local = shadowgraft.apply(instruct=hub_trio["instruct"], base=hub_trio["base"], tuned=hub_trio["tuned"], output=tmp_path / "a")
    remote = shadowgraft.apply(instruct="org/instruct", base="org/base@main", tuned="me/tuned", output=tmp_path / "b")
    assert local.plan.grafted == remote.plan.grafted and len(remote.plan.grafted) == 2 * 7
    a, b = shard_bytes(tmp_path / "a"), shard_bytes(tmp_path / "b")
    assert len(a) > 1 and a == b
    assert (tmp_path / "a" / "model.safetensors.index.json").read_text() == (tmp_path / "b" / "model.safetensors.index.json").read_text()
    assert (tmp_path / "b" / "tokenizer_config.json").read_text() == (hub_trio["instruct"] / "tokenizer_config.json").read_text()
    rec = json.loads((tmp_path / "b" / "shadowgraft.json").read_text())
    assert rec["inputs"]["instruct"]["repo_id"] == "org/instruct" and rec["inputs"]["instruct"]["commit"] == "0" * 40
    assert rec["inputs"]["base"]["revision"] == "main" and rec["inputs"]["base"]["commit"] == "1" * 40
    assert rec["inputs"]["tuned"]["commit"] == "2" * 40
    rec_local = json.loads((tmp_path / "a" / "shadowgraft.json").read_text())
    assert rec_local["inputs"]["tuned"]["path"] == str(hub_trio["tuned"].absolute())
    assert rec_local["inputs"]["tuned"]["header_sha256"] == rec["inputs"]["tuned"]["header_sha256"]


def test_stats_on_hub_ids_matches_local_folders(hub_trio, capsys):
    from shadowgraft.cli import cli

    if "stats" not in cli.commands:
        pytest.skip("no stats command in this build")
    results = []
    for a, b in ((hub_trio["base"], hub_trio["instruct"]), ("org/base", "org/instruct")):
        code, out, err = run_cli(["stats", str(a), str(b), "--json", "-"], capsys)
        assert code == 0, err
        results.append(json.loads(out))
    assert results[0]["summary"] == results[1]["summary"] and results[0]["summary"]["n_tensors"] > 0
    assert results[0]["tensors"] == results[1]["tensors"]


def test_revision_picks_the_right_snapshot(tmp_path, cache):
    trio = make_trio(tmp_path / "local", shape=Shape(layers=1))
    to_cache(cache, "org/m", trio["base"], COMMIT_A, refs=("main",))
    to_cache(cache, "org/m", trio["tuned"], COMMIT_B, refs=("v2", "refs/pr/1"))
    name = "model.layers.0.mlp.up_proj.weight"

    def first_bytes(ck, n=64):
        buf = bytearray(n)
        ck.read_into(ck[name], 0, buf)
        return bytes(buf)

    with Checkpoint.open(trio["base"]) as b, Checkpoint.open(trio["tuned"]) as t:
        want = {"base": first_bytes(b), "tuned": first_bytes(t)}
    assert want["base"] != want["tuned"]
    cases = {"org/m": (COMMIT_A, "base"), "org/m@main": (COMMIT_A, "base"), "org/m@v2": (COMMIT_B, "tuned"),
             "org/m@refs/pr/1": (COMMIT_B, "tuned"), f"org/m@{COMMIT_A}": (COMMIT_A, "base")}
    for spec, (commit, role) in cases.items():
        with Checkpoint.open(spec) as ck:
            assert ck.commit == commit, spec
            assert ck.revision == hub.parse_spec(spec)[1]
            assert first_bytes(ck) == want[role], spec


def _apply_offline(tmp_path, capsys, instruct: str, base: str) -> str:
    """``apply`` with these Hub ids offline: exit 1, nothing written; returns stderr."""
    code, out, err = run_cli(["apply", "--instruct", instruct, "--base", base, "--tuned", "me/tuned",
                              "--output", str(tmp_path / "o")], capsys)
    assert code == 1 and not (tmp_path / "o").exists()
    return err


def test_missing_repo_offline_is_one_line_exit_1(tmp_path, hub_trio, cache, capsys):
    err = _apply_offline(tmp_path, capsys, "org/instruct", "org/nope")
    assert err.strip() == (f"error: org/nope: no such local path, and not in the Hub cache {cache} with HF_HUB_OFFLINE=1 set; "
                           "run once online to download it, or pass a local folder")


def test_missing_revision_offline_is_one_line_exit_1(tmp_path, hub_trio, cache, capsys):
    err = _apply_offline(tmp_path, capsys, "org/instruct@v9", "org/base")
    assert err.strip() == (f"error: org/instruct@v9: revision 'v9' is not in the Hub cache {cache} (cached refs: main) and "
                           "HF_HUB_OFFLINE=1 is set; run once online to fetch it, or name a cached revision")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ShadowgraftError, match=r"^org/instruct@0000000: revision '0000000' \(a commit hash must have all 40 "):
        hub.resolve("org/instruct@0000000")


def test_bad_specs(cache):
    with pytest.raises(ShadowgraftError) as exc:
        hub.resolve("org/m@")
    assert str(exc.value) == "org/m@: empty revision after '@'; write org/name@branch, @tag or @commit-hash"
    with pytest.raises(ShadowgraftError) as exc:
        Checkpoint.open("bad--name")
    assert str(exc.value) == ("bad--name: no such local path, and not a valid Hub repo id (Cannot have -- or .. in repo_id: "
                              "'bad--name'.); pass a local folder or org/name[@revision]")


def test_pickle_only_repo_is_refused(tmp_path, cache):
    folder = tmp_path / "pickle"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02not really")
    to_cache(cache, "org/old", folder, COMMIT_A)
    with pytest.raises(ShadowgraftError, match=r"^org/old: no \.safetensors weights at commit a1a1.*never downloaded"):
        hub.resolve("org/old")


def test_snapshot_missing_a_shard_says_to_finish_the_download(hub_trio, cache):
    snap = cache / "models--org--base" / "snapshots" / ("1" * 40)
    victim = sorted(snap.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(ShadowgraftError, match=f"^org/base: shard '{victim.name}' named by the index is not in the snapshot"):
        hub.resolve("org/base")


def test_local_path_wins_over_a_repo_id_of_the_same_spelling(tmp_path, hub_trio, monkeypatch):
    # ./org/base exists locally and holds *tuned*; the cache's org/base holds base.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "base").symlink_to(hub_trio["tuned"], target_is_directory=True)
    with Checkpoint.open("org/base") as ck, Checkpoint.open(hub_trio["tuned"]) as tuned:
        assert ck.repo_id is None and ck.commit is None
        assert ck.header_hashes() == tuned.header_hashes()


def test_only_needed_files_are_asked_for(tmp_path, cache, monkeypatch):
    """The allow-patterns sent to snapshot_download, applied to a real-looking repo listing."""
    import huggingface_hub

    trio = make_trio(tmp_path / "local", shape=Shape(layers=1), shard_bytes=20_000)
    to_cache(cache, "org/m", trio["instruct"], COMMIT_A)
    shards = sorted(p.name for p in trio["instruct"].glob("*.safetensors"))
    asked = []
    real = huggingface_hub.snapshot_download

    def spy(repo_id, **kw):
        asked.append(kw)
        return real(repo_id, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    hub.resolve("org/m")
    assert asked[0]["revision"] is None and asked[0]["local_files_only"] is True and asked[0]["cache_dir"] == str(cache)
    # Every shard was already in the commit's snapshot: no second call.
    assert len(asked) == 1
    listing = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
               "special_tokens_map.json", "chat_template.jinja", "README.md", "LICENSE", "model.safetensors.index.json",
               *shards, "consolidated.safetensors", "pytorch_model.bin", "pytorch_model.bin.index.json",
               "model.gguf", "original/consolidated.00.pth", "optimizer.pt", "training_args.bin", ".gitattributes"]
    side = set(filter_repo_objects(listing, allow_patterns=asked[0]["allow_patterns"]))
    assert side == {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                    "special_tokens_map.json", "chat_template.jinja", "README.md", "LICENSE", "model.safetensors.index.json"}
    # Drop one shard from the snapshot: the second call asks for exactly the indexed shards, pinned to the commit.
    snap = cache / "models--org--m" / "snapshots" / COMMIT_A
    (snap / shards[0]).unlink()
    asked.clear()
    with pytest.raises(ShadowgraftError, match="run once online to finish the download"):
        hub.resolve("org/m")
    assert len(asked) == 2 and asked[1]["revision"] == COMMIT_A
    got = set(filter_repo_objects(listing, allow_patterns=asked[1]["allow_patterns"]))
    assert got == side | set(shards)


def test_custom_patterns_fetch_exactly_those(tmp_path, cache, monkeypatch):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(b"")
    to_cache(cache, "me/lora", folder, COMMIT_B, refs=("main",))
    res = hub.resolve("me/lora@main", patterns=["adapter_config.json", "adapter_model.safetensors"])
    assert (res.repo_id, res.revision, res.commit) == ("me/lora", "main", COMMIT_B)
    assert (res.path / "adapter_config.json").is_file()


def _http_error(cls, status, text):
    httpx2 = pytest.importorskip("httpx2", reason="error objects are built the way huggingface_hub 2.x builds them")

    req = httpx2.Request("GET", "https://huggingface.co/api/models/org/x/revision/main")
    return cls(text, response=httpx2.Response(status, request=req))


@pytest.mark.parametrize("error, want", [
    ("gated", "org/x: org/x is gated; request access at https://huggingface.co/org/x, then log in with `hf auth login` "
              "or set HF_TOKEN"),
    ("missing", "org/x: no such local path, and no Hub repo org/x is visible (it does not exist, or it is private and no "
                "valid token was sent); check the spelling, or log in with `hf auth login` / set HF_TOKEN"),
    ("revision", "org/x: revision 'main' does not exist on the Hub; use an existing branch, tag or full commit hash"),
    ("down", "org/x: the Hub cannot be reached and revision 'main' is not in the cache {cache}; check the network "
             "(and HF_ENDPOINT), or pass a local folder"),
])
def test_online_errors_through_the_real_snapshot_download(cache, monkeypatch, error, want):
    """snapshot_download runs for real; only the Hub's answer to its first request is replaced."""
    httpx2 = pytest.importorskip("httpx2", reason="error objects are built the way huggingface_hub 2.x builds them")
    from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    answers = {"gated": lambda: _http_error(GatedRepoError, 403, "Access to model org/x is restricted."),
               "missing": lambda: _http_error(RepositoryNotFoundError, 404, "Repository Not Found for url."),
               "revision": lambda: _http_error(RevisionNotFoundError, 404, "Revision Not Found for url."),
               "down": lambda: httpx2.ConnectError("[Errno -2] Name or service not known")}

    def repo_info(self, *a, **kw):
        raise answers[error]()

    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    with pytest.raises(ShadowgraftError) as exc:
        hub.resolve("org/x")
    assert str(exc.value) == want.format(cache=cache)


def test_verify_takes_a_hub_id_and_checks_blobs(hub_trio, cache, capsys):
    code, out, err = run_cli(["verify", IDS["instruct"], "--hash", "--quiet"], capsys)
    assert (code, err) == (0, "")
    snapshot = cache / "models--org--instruct" / "snapshots" / ("0" * 40)
    names = sorted(p.name for p in snapshot.glob("*.safetensors"))
    hashed = dict(line.split("  ")[::-1] for line in out.splitlines())
    assert sorted(hashed) == names
    for n in names:
        # The blob a snapshot file links to is named by its sha256.
        assert hashed[n] == (snapshot / n).resolve().name == hashlib.sha256((snapshot / n).read_bytes()).hexdigest()
    # One flipped byte inside a blob: --hash names the file, exit 1, one line.
    blob = (snapshot / names[0]).resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01
    blob.write_bytes(bytes(data))
    code, out, err = run_cli(["verify", IDS["instruct"], "--hash", "--quick", "--quiet"], capsys)
    assert code == 1 and names[0] in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["verify", "org/not-there"], capsys)
    assert code == 1 and "org/not-there" in err and len(err.strip().splitlines()) == 1


def test_a_cached_ref_whose_snapshot_is_gone_says_so(tmp_path, hub_trio, cache, capsys):
    repo = cache / "models--org--instruct"
    (repo / "refs" / "v2").write_text("f" * 40)  # a ref to a snapshot that is not there
    with pytest.raises(ShadowgraftError) as e:
        hub.resolve("org/instruct@v2")
    assert str(e.value) == (f"org/instruct@v2: the Hub cache {cache} names revision 'v2' (commit ffffffffffff) but holds no "
                            "snapshot of it, and HF_HUB_OFFLINE=1 is set; run once online to download it again")
