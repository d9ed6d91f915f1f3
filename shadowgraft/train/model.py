"""Load the model and tokenizer to train, add LoRA, and write the finished result.

transformers and peft come from the optional ``train`` extra; they are
imported here, only when a training command runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ShadowgraftError
from .config import TrainConfig

EXTRA = "pip install shadowgraft[train]"


def require_extra(*, lora: bool) -> None:
    """Fail with the install command when transformers / tokenizers (and peft for LoRA) are missing."""
    need = ["transformers", "tokenizers"] + (["peft"] if lora else [])
    missing = []
    for name in need:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ShadowgraftError(f"training needs the train extra (missing: {', '.join(missing)}); run: {EXTRA}")


def require_packed_masks() -> None:
    """Fail when this transformers cannot keep packed examples apart (it would let them attend to each other)."""
    try:
        from transformers import masking_utils
    except ImportError:
        masking_utils = None
    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        import transformers

        raise ShadowgraftError(f"--packing needs a transformers that masks packed examples apart (4.54 or newer; this is "
                               f"{transformers.__version__}); run: pip install -U transformers, or train without --packing")


def packing_isolated(model, tokens: list[int]) -> bool:
    """Whether ``model`` keeps packed examples apart when given restarting position ids and no mask.

    transformers builds a block-diagonal mask from such position ids for most
    architectures, but not for all (ALiBi models such as Bloom and MPT, custom
    code). The probe packs two 4-token pieces of ``tokens`` and compares the
    second one's logits with its logits alone; the same run without position
    ids measures how far attending across moves them, so the verdict does not
    hang on the model's dtype.
    """
    import torch

    if len(tokens) < 8:
        tokens = (list(tokens) * 8)[:8]
    ids = torch.tensor([tokens[:8]], device=next(model.parameters()).device)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]], device=ids.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0, 4:].float()
            crossed = model(input_ids=ids, use_cache=False).logits[0, 4:].float()
            alone = model(input_ids=ids[:, 4:], use_cache=False).logits[0].float()
    finally:
        model.train(was_training)
    leak = float((crossed - alone).abs().max())
    return float((packed - alone).abs().max()) <= 0.25 * leak


def _source(spec: str) -> tuple[str, str | None]:
    """A local path as is, or a Hub id split into (repo_id, revision)."""
    if Path(spec).expanduser().exists():
        return str(Path(spec).expanduser()), None
    from ..checkpoint import is_repo_spec
    from ..hub import parse_spec

    if not is_repo_spec(spec) or spec.endswith(".jinja"):
        raise FileNotFoundError(f"{spec}: no such file or folder (and not a Hub repo id)")
    return parse_spec(spec)


def load_tokenizer(model: str, chat_template_from: str | None):
    """The model's tokenizer and the chat template to format conversations with (None when there is none).

    ``chat_template_from`` may be a model (its tokenizer's template is used)
    or a ``.jinja`` file.
    """
    tok = _tokenizer(model)
    template = getattr(tok, "chat_template", None)
    if chat_template_from is not None:
        if chat_template_from.endswith(".jinja") and Path(chat_template_from).is_file():
            try:
                template = Path(chat_template_from).read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise ShadowgraftError(f"{chat_template_from}: not UTF-8 text ({e.reason} at byte {e.start}); "
                                       "save the template as UTF-8") from None
        else:
            template = getattr(_tokenizer(chat_template_from), "chat_template", None)
            if not template:
                raise ShadowgraftError(f"{chat_template_from}: its tokenizer has no chat template; "
                                       "pass another --chat-template-from, or a .jinja file")
    if isinstance(template, dict):  # several named templates: the default one formats chats
        template = template.get("default")
    return tok, template


def _tokenizer(spec: str):
    from transformers import AutoTokenizer

    from ..hub import is_offline

    path, rev = _source(spec)
    try:
        return AutoTokenizer.from_pretrained(path, revision=rev)
    except (OSError, ValueError) as e:
        if not Path(path).exists() and is_offline():
            raise ShadowgraftError(f"{spec}: no such local path, and not in the Hub cache with HF_HUB_OFFLINE=1 set; "
                                   "run once online to download it, or pass a local folder") from None
        raise ShadowgraftError(f"{spec}: cannot load its tokenizer ({' '.join(str(e).split())[:200]}); "
                               "pass a model folder or Hub id that has tokenizer files") from None


def load_model(cfg: TrainConfig, *, bf16: bool, quiet: bool = False):
    """The causal LM to train, plus the dtype each of its tensors is stored in (to save it the same way)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if quiet:
        hf_logging.disable_progress_bar()

    path, rev = _source(cfg.model)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, revision=rev, dtype="auto")
    except (OSError, ValueError) as e:
        raise ShadowgraftError(f"{cfg.model}: cannot load it as a causal language model ({' '.join(str(e).split())[:200]})") from None
    stored = {n: t.dtype for n, t in model.state_dict().items()}
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        # The non-reentrant form also works when the embeddings are frozen (LoRA).
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.is_lora:
        if not bf16:
            model.float()
        model = _add_lora(model, cfg)
    return model, stored


def _add_lora(model, cfg: TrainConfig):
    import warnings

    from peft import LoraConfig, get_peft_model

    # peft still calls a transformers method that warns it was renamed; nothing for users to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    lc = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.lora_dropout,
        # Every linear layer except the output head, as in the paper.
        target_modules="all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(cfg.seed)  # identical LoRA initialisation on every rank
    return get_peft_model(model, lc)


def tied_names(model) -> set[str]:
    """State-dict names that are views of another tensor (a tied lm_head), left out when saving."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not getattr(cfg, "tie_word_embeddings", False):
        return set()
    out = model.get_output_embeddings()
    return {f"{name}.weight" for name, m in model.named_modules() if out is not None and m is out}


def save_full(folder: Path, *, model, state: dict[str, torch.Tensor], stored: dict[str, torch.dtype], tokenizer,
              template: str | None, max_shard_size: str | None) -> None:
    """Write a full fine-tuned checkpoint: safetensors in the base's dtypes, config, generation config, tokenizer."""
    from ..save import save_tensors

    skip = tied_names(model)
    tensors = {k: v for k, v in state.items() if k not in skip}
    save_tensors(folder, tensors, max_shard_size=max_shard_size, dtypes={k: stored[k] for k in tensors if k in stored})
    dtypes = [stored[k] for k in tensors if k in stored]
    main = max(set(dtypes), key=dtypes.count) if dtypes else torch.float32
    model.config.dtype = main  # the config must describe the saved weights, not the fp32 training copy
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    _save_tokenizer(folder, tokenizer, template)


def save_adapter(folder: Path, *, model, tokenizer, template: str | None) -> None:
    """Write a standard PEFT adapter folder (adapter_config.json + adapter_model.safetensors) and the tokenizer."""
    model.save_pretrained(folder, safe_serialization=True)
    _save_tokenizer(folder, tokenizer, template)


def _save_tokenizer(folder: Path, tokenizer, template: str | None) -> None:
    if template is not None:
        tokenizer.chat_template = template  # the format the weights were trained on
    tokenizer.save_pretrained(folder)


def write_json(path: Path, obj: dict, *, indent: int | None = 2) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent) + "\n")
    tmp.replace(path)
