"""Read a PEFT LoRA adapter: its config, checked, and its factors as low-rank terms per module.

A LoRA adapter trained on BASE is a low-rank change ``scale * B @ A`` per
module. PEFT's conventions are followed exactly (``peft.tuners.lora``):

- keys ``base_model.model.<module>.lora_A.weight`` (r x in) and
  ``lora_B.weight`` (out x r); embeddings store ``lora_embedding_A`` (r x vocab)
  and ``lora_embedding_B`` (dim x r) and their change is ``(B @ A).T``;
- ``scale = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``;
  ``rank_pattern`` / ``alpha_pattern`` override r and alpha per module, the
  first key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)`` winning.

Every number in the config that scales the change (``r``, ``lora_alpha``, the
values of ``rank_pattern`` / ``alpha_pattern``) must be finite and positive:
json reads ``NaN`` and ``1e400`` (inf) without complaint, and either would
graft NaN into every target.

Anything whose merge is not that sum (DoRA, trained biases, modules_to_save,
PiSSA-style inits that rewrite base, other variants) is refused with the
option named and a way out: merge the adapter into base with PEFT, then graft
with ``--base BASE --tuned MERGED``, which is exact for every adapter type.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .checkpoint import Checkpoint, is_repo_spec, missing_path
from .files import file_problem, pickle_refusal, regular_file
from .errors import ShadowgraftError
from .header import TensorInfo
from .naming import module_kind
from . import lora_params
from .record import RECORD_NAME, read_record

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
HUB_PATTERNS = [CONFIG_NAME, WEIGHTS_NAME, "README.md"]
PREFIX = "base_model.model."
_BASE_LAYER = ".base_layer"
MERGE_HINT = ("merge it into base with PEFT (PeftModel.merge_and_unload().save_pretrained(DIR)) "
              "and graft with --base BASE --tuned DIR instead")

_LINEAR_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.(?P<name>[^.]+))?\.weight$")
_EMBED_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_embedding_A|lora_embedding_B)(?:\.(?P<name>[^.]+))?$")

# Config options that change what a merge means; any truthy value is refused.
_VARIANTS = {
    "use_dora": "DoRA rescales each weight by a magnitude learned against base's own norms, so it is not a change that can be added to instruct",
    "lora_bias": "lora_bias trains a bias on lora_B, which is not supported here",
    "use_qalora": "QA-LoRA pools the input groups of a quantized base, so its merge is not W + B @ A",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) only acts after its invocation tokens and cannot be merged",
    "layer_replication": "layer_replication changes the model's layer stack",
    "trainable_token_indices": "trainable_token_indices stores whole new embedding rows learned on base",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported here",
    "arrow_config": "Arrow routing (arrow_config) mixes several adapters per token and cannot be merged",
    "kasa_config": "KaSA (kasa_config) is not supported here",
    "velora_config": "VeLoRA (velora_config) is not supported here",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported here",
}
# Initialisations that subtract the initial adapter from base's weights, so
# the saved adapter only makes sense on that rewritten base.
_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its factors and the scale PEFT gives it."""

    module: str  # e.g. model.layers.0.self_attn.q_proj
    a: TensorInfo
    b: TensorInfo
    r: int
    alpha: float
    scale: float
    embedding: bool  # lora_embedding_A/B: the change is (B @ A).T
    # LoRA on raw parameters (target_parameters): the parameters of ``module``
    # this pair may belong to, resolved against instruct's shapes when planning
    # (lora_params.py); r, alpha and scale then come from the one that fits.
    params: tuple[str, ...] = ()
    depth: int = 0  # how many base_layer wrappers PEFT nested it under

    @property
    def key(self) -> str:
        """The module as the adapter's keys name it."""
        return self.module + ".base_layer" * self.depth


@dataclass
class Adapter:
    """A PEFT LoRA adapter on disk (local folder or Hub snapshot), parsed and checked.

    >>> ad = open_adapter("./lora-on-base")                 # doctest: +SKIP
    >>> ad.config["r"], len(ad.modules)                     # doctest: +SKIP
    (16, 196)
    """

    source: str
    path: Path
    config: dict
    checkpoint: Checkpoint
    modules: tuple[LoraModule, ...]
    frozen_copies: tuple[str, ...]  # full base weights PEFT saved alongside (save_embedding_layers)
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None

    @property
    def checkpoints(self) -> list[Checkpoint]:
        """What the engine must be able to read from."""
        return [self.checkpoint]

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    def describe(self) -> dict:
        """Provenance for ``shadowgraft.json``."""
        d: dict = {"source": self.source}
        if self.repo_id:
            d.update(repo_id=self.repo_id, revision=self.revision, commit=self.commit)
        else:
            d["path"] = str(self.path.absolute())
        d["header_sha256"] = self.checkpoint.header_hashes()
        d["sample_sha256"] = self.checkpoint.sample_hash()
        c = self.config
        d.update(peft_type=c.get("peft_type"), r=c.get("r"), lora_alpha=c.get("lora_alpha"),
                 use_rslora=bool(c.get("use_rslora", False)), target_modules=c.get("target_modules"),
                 target_parameters=c.get("target_parameters") or [],
                 rank_pattern=c.get("rank_pattern") or {}, alpha_pattern=c.get("alpha_pattern") or {},
                 fan_in_fan_out=self.fan_in_fan_out, base_model_name_or_path=c.get("base_model_name_or_path"),
                 modules=len(self.modules))
        return d

    def close(self) -> None:
        self.checkpoint.close()

    def __enter__(self) -> "Adapter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_adapter(spec: str | os.PathLike) -> Adapter:
    """Open a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) or Hub id.

    Every key and config option is checked here, before any output exists.

    >>> open_adapter("someone/llama-lora@main").config["peft_type"]   # doctest: +SKIP
    'LORA'
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    repo = None
    if path.is_file() and path.name in (CONFIG_NAME, WEIGHTS_NAME):
        path = path.parent
    if not path.exists():
        if is_repo_spec(spec):
            from . import hub  # lazy: only Hub users pay for it

            repo = hub.resolve(text, patterns=HUB_PATTERNS)
            path = repo.path
        else:
            raise missing_path(spec, "adapter folder")
    if not path.is_dir():
        raise ShadowgraftError(f"{path}: an adapter is a folder holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    config = _read_config(path)
    weights = path / WEIGHTS_NAME
    if not os.path.lexists(weights):  # a FIFO or a link out is refused by Checkpoint.open, not taken for missing
        if (path / "adapter_model.bin").is_file():
            raise pickle_refusal(path / "adapter_model.bin")
        raise ShadowgraftError(f"{path}: no {WEIGHTS_NAME}; save the adapter with PEFT's save_pretrained()")
    ck = Checkpoint.open(weights)
    try:
        modules, frozen = _parse_keys(ck, config, source=text)
    except BaseException:
        ck.close()
        raise
    ad = Adapter(text, path, config, ck, modules, frozen)
    if repo is not None:
        ad.repo_id, ad.revision, ad.commit = repo.repo_id, repo.revision, repo.commit
    return ad


def _read_config(folder: Path) -> dict:
    f = folder / CONFIG_NAME
    if not os.path.lexists(f):
        if file_problem(folder / RECORD_NAME, folder) is None and (read_record(folder) or {}).get("kind") == "delta":
            raise ShadowgraftError(f"{folder}: a full delta written by shadowgraft diff, not an adapter; pass it with --delta")
        raise ShadowgraftError(f"{folder}: no {CONFIG_NAME}; this is not a PEFT adapter folder")
    regular_file(f, folder)  # before reading: a FIFO would block, a link could point anywhere
    try:
        c = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ShadowgraftError(f"{f}: not valid JSON; re-save the adapter with PEFT") from None
    if not isinstance(c, dict):
        raise ShadowgraftError(f"{f}: not a JSON object; re-save the adapter with PEFT")
    ptype = str(c.get("peft_type", "")).upper()
    if ptype != "LORA":
        raise ShadowgraftError(f"{f}: peft_type '{c.get('peft_type')}' is not supported; only LORA adapters can be grafted, "
                               f"otherwise {MERGE_HINT}")
    for opt, why in _VARIANTS.items():
        if c.get(opt):
            raise ShadowgraftError(f"{f}: {opt} is set: {why}; {MERGE_HINT}")
    init = str(c.get("init_lora_weights", True)).lower()
    if init.startswith(_REWRITING_INITS):
        raise ShadowgraftError(
            f"{f}: init_lora_weights='{c.get('init_lora_weights')}' subtracts the initial adapter from base's weights, so the "
            "adapter only fits that rewritten base; convert it with save_pretrained(..., path_initial_model_for_weight_conversion=...) "
            f"or {MERGE_HINT}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(c.get(key) or {}, dict):
            raise ShadowgraftError(f"{f}: '{key}' must map module patterns to numbers")
    _check_rank(f, "r", c.get("r"))
    _check_alpha(f, "lora_alpha", c.get("lora_alpha"))
    for k, v in (c.get("rank_pattern") or {}).items():
        _check_rank(f, f"rank_pattern['{k}']", v)
    for k, v in (c.get("alpha_pattern") or {}).items():
        _check_alpha(f, f"alpha_pattern['{k}']", v)
    return c


def _check_rank(f: Path | str, key: str, r: object) -> None:
    if type(r) is not int or r <= 0:
        raise ShadowgraftError(f"{f}: {key} is {r!r}; a LoRA rank must be a positive integer; fix the adapter config")


def _check_alpha(f: Path | str, key: str, alpha: object) -> None:
    # bool is an int to Python, and NaN / inf pass every comparison a plain "> 0" would make.
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
        raise ShadowgraftError(f"{f}: {key} is {alpha!r}; lora_alpha must be a finite positive number "
                               "(PEFT scales the change by lora_alpha / r); fix the adapter config")


def pattern_key(keys: Sequence[str], module: str) -> str | None:
    """The ``rank_pattern`` / ``alpha_pattern`` key PEFT applies to ``module`` (first match wins), or None.

    >>> pattern_key(["q_proj", "layers.1.mlp.up_proj"], "model.layers.1.mlp.up_proj")
    'layers.1.mlp.up_proj'
    """
    for k in keys:
        try:
            if re.match(rf"(.*\.)?({k})$", module):
                return k
        except re.error as e:
            raise ShadowgraftError(f"{CONFIG_NAME}: pattern key '{k}' is not a valid regular expression ({e}); fix the adapter config") from None
    return None


def module_scale(config: dict, module: str) -> tuple[int, float, float]:
    """``(r, lora_alpha, scale)`` that PEFT gives ``module`` under ``config``.

    >>> module_scale({"r": 16, "lora_alpha": 32, "use_rslora": True}, "model.layers.0.self_attn.q_proj")
    (16, 32, 8.0)
    """
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rk, ak = pattern_key(list(ranks), module), pattern_key(list(alphas), module)
    r = ranks[rk] if rk is not None else config["r"]
    alpha = alphas[ak] if ak is not None else config["lora_alpha"]
    _check_rank(CONFIG_NAME, f"r for '{module}'" + (f" (rank_pattern['{rk}'])" if rk is not None else ""), r)
    _check_alpha(CONFIG_NAME, f"lora_alpha for '{module}'" + (f" (alpha_pattern['{ak}'])" if ak is not None else ""), alpha)
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return r, alpha, scale


def _untargeted(config: dict, module: str) -> str | None:
    """Why PEFT, loading this config, would put no LoRA layer on ``module`` (so not merge its factors); None if it would.

    PEFT's own rules: ``target_modules`` a list of name suffixes or one regex
    matched whole (``all-linear`` and no value are resolved from the model,
    left to the keys here); ``exclude_modules`` the same; ``layers_to_transform``
    keeps modules whose index after ``layers_pattern`` (any ``.name.N.``
    when unset) it lists.
    """
    tm = config.get("target_modules")
    if tm not in (None, "all-linear") and not lora_params.in_target_modules(config, module):
        return f"target_modules {tm!r} does not name it"
    ex = config.get("exclude_modules")
    if ex and lora_params.names_module(ex, module):
        return f"exclude_modules {ex!r} names it"
    layers = config.get("layers_to_transform")
    exact = isinstance(tm, list) and module in tm  # PEFT applies no layer rule to a module named in full
    if layers not in (None, []) and not exact:  # an empty list means every layer, as in PEFT
        wanted = [layers] if isinstance(layers, int) else list(layers)
        pattern = config.get("layers_pattern")
        patterns = [pattern] if isinstance(pattern, str) else list(pattern or [r"[^.]*"])
        m = next((m for p in patterns if (m := re.match(rf".*\.{p}\.(\d+)\.", module))), None)
        if m is None or int(m.group(1)) not in wanted:
            return f"layers_to_transform {layers!r} leaves it out"
    return None


def _parse_keys(ck: Checkpoint, config: dict, *, source: str) -> tuple[tuple[LoraModule, ...], tuple[str, ...]]:
    where = f"{source} ({WEIGHTS_NAME})"
    parts: dict[tuple[str, bool], dict[str, TensorInfo]] = {}
    names: set[str] = set()
    frozen: list[str] = []
    keep = config.get("modules_to_save") or []
    for key, info in ck.tensors.items():
        if not key.startswith(PREFIX):
            raise ShadowgraftError(f"{where}: key '{key}' does not start with '{PREFIX}'; this is not a PEFT adapter saved with save_pretrained()")
        rest = key[len(PREFIX):]
        if "lora_magnitude_vector" in rest:
            raise ShadowgraftError(f"{where}: '{key}' is a DoRA magnitude (use_dora): {_VARIANTS['use_dora']}; {MERGE_HINT}")
        m = _LINEAR_KEY.match(rest) or _EMBED_KEY.match(rest)
        if m:
            if m.group("name"):
                names.add(m.group("name"))
            emb = m.group("part").startswith("lora_embedding")
            parts.setdefault((m.group("module"), emb), {})[m.group("part")[-1]] = info
            continue
        module = rest.rsplit(".", 1)[0]
        if "trainable_tokens" in rest:
            raise ShadowgraftError(f"{where}: '{key}' holds trainable token rows (trainable_token_indices): "
                                   f"{_VARIANTS['trainable_token_indices']}; {MERGE_HINT}")
        if rest.endswith("lora_B.bias"):
            raise ShadowgraftError(f"{where}: '{key}' is a LoRA bias (lora_bias): {_VARIANTS['lora_bias']}; {MERGE_HINT}")
        if any(module == k or module.endswith("." + k) or module.startswith(k + ".") or f".{k}." in module for k in keep):
            raise ShadowgraftError(
                f"{where}: '{key}' is a whole module trained on base (modules_to_save={keep}); its learned change cannot be "
                f"told apart from base's values without base; {MERGE_HINT}")
        if rest.endswith(".bias"):
            raise ShadowgraftError(
                f"{where}: '{key}' is a bias trained on base (bias='{config.get('bias')}'); the adapter stores its whole "
                f"trained value, not a change, so it cannot be grafted without base; retrain with bias='none' or {MERGE_HINT}")
        if rest.endswith(".base_layer.weight") or module_kind(rest) in ("embed", "lm_head"):
            # PEFT's save_embedding_layers stores base's frozen embedding
            # weights next to the adapter; they are no change to graft.
            frozen.append(rest.replace(".base_layer.", "."))
            continue
        raise ShadowgraftError(f"{where}: key '{key}' is not a LoRA factor (lora_A/lora_B/lora_embedding_A/B) and cannot be grafted; "
                               "remove it or " + MERGE_HINT)
    if len(names) > 1:
        raise ShadowgraftError(f"{where}: holds several adapters ({', '.join(sorted(names))}); save each one alone with save_pretrained()")
    modules = []
    for (module, emb), ab in sorted(parts.items()):
        kind = "lora_embedding_" if emb else "lora_"
        owner, depth = lora_params.split_key(module)
        params = () if emb else tuple(lora_params.params_of(config, owner))
        nested = bool(depth) or (owner + _BASE_LAYER, emb) in parts
        if nested and not params:
            raise ShadowgraftError(f"{where}: '{owner}{_BASE_LAYER}' is a nested LoRA layer but {CONFIG_NAME} targets no "
                                   f"parameter of '{owner}' (target_parameters); the config does not match the weights")
        if params and lora_params.in_target_modules(config, owner):
            if nested:
                raise ShadowgraftError(f"{where}: '{owner}' is adapted both as a module (target_modules) and through its "
                                       f"parameters (target_parameters), which is not supported here; {MERGE_HINT}")
            params = ()  # a module target_modules names: a target parameter like "down_proj" matches any name
        if set(ab) != {"A", "B"}:
            have, miss = next(iter(ab)), ({"A", "B"} - set(ab)).pop()
            raise ShadowgraftError(f"{where}: '{module}' has {kind}{have} but no {kind}{miss}; the adapter file is incomplete")
        a, b = ab["A"], ab["B"]
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise ShadowgraftError(f"{where}: '{module}' has {len(a.shape)}-D LoRA factors (a convolution LoRA); only Linear, "
                                   "Conv1D and Embedding adapters can be grafted")
        if not (a.is_float and b.is_float):
            raise ShadowgraftError(f"{where}: '{module}' factors are {a.dtype}/{b.dtype}; quantized adapters cannot be grafted, "
                                   "save a float copy with PEFT")
        if params:
            # r and alpha depend on which parameter this pair adapts: known once instruct's shapes are.
            modules.append(LoraModule(owner, a, b, 0, 0.0, 0.0, False, params=params, depth=depth))
            continue
        why = _untargeted(config, module)
        if why:
            raise ShadowgraftError(f"{where}: '{module}' has LoRA factors but {CONFIG_NAME}'s {why}, so PEFT would not "
                                   "merge them; the config does not match the weights, re-save the adapter with PEFT")
        r, alpha, scale = module_scale(config, module)
        if a.shape[0] != r or b.shape[1] != r:
            raise ShadowgraftError(f"{where}: '{module}' factors have rank {a.shape[0]}/{b.shape[1]} but {CONFIG_NAME} gives r={r} "
                                   "(r / rank_pattern); the config does not match the weights")
        modules.append(LoraModule(module, a, b, r, alpha, scale, emb))
    if not modules:
        raise ShadowgraftError(f"{where}: no LoRA factors (lora_A/lora_B) found; the adapter is empty")
    return tuple(modules), tuple(frozen)
