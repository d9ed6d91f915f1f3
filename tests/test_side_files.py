"""The side files carried with an output: one list, for local folders and for Hub downloads."""

from huggingface_hub.utils import filter_repo_objects

from shadowgraft.hub import SIDE_PATTERNS
from shadowgraft.writer import copy_side_files, side_files

# A multimodal model folder as published, with the files transformers and its processors read ...
READ = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
        "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
        "chat_template.json", "additional_chat_templates/tool_use.jinja", "processor_config.json",
        "preprocessor_config.json", "video_preprocessor_config.json", "configuration_deepseek.py", "modeling_deepseek.py",
        "tiktoken.model"]
# ... and what it does not read.
OTHER = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "optimizer.pt", "training_args.bin",
         "notes.txt", "inference.py", "original/consolidated.00.pth", ".gitattributes", "trainer_state.json", "README.md"]


def test_local_copy_takes_exactly_what_transformers_reads(tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    for name in READ + OTHER + ["LICENSE"]:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(name)
    dst.mkdir()
    copied = copy_side_files(side_files(src), dst)
    assert sorted(copied) == sorted(READ + ["LICENSE"])
    assert sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file()) == sorted(READ + ["LICENSE"])
    assert (dst / "additional_chat_templates" / "tool_use.jinja").read_text() == "additional_chat_templates/tool_use.jinja"


def test_hub_download_asks_for_the_same_list(tmp_path):
    got = set(filter_repo_objects(READ + OTHER + ["LICENSE"], allow_patterns=list(SIDE_PATTERNS)))
    # README.md too: the model card copies its license metadata.
    assert got == set(READ) | {"LICENSE", "README.md"}
