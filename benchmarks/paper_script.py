"""A graft done the way the official Shadow-FT script does it, as a baseline to time.

The official script loads base, instruct and tuned whole with ``transformers``
(bf16), adds ``tuned - base`` to instruct's q/k/v/o/gate/up/down projections
in bf16, and saves instruct with ``save_pretrained``. This script keeps those
costs without needing ``transformers``: all three models are read fully into
RAM with ``safetensors.torch.load_file``, the arithmetic is bf16 tensor ops
(``tuned - base`` rounded to bf16, then added to instruct and rounded again),
and the result is written with ``save_file`` in 5 GB shards as
``save_pretrained`` does. Like the original, it checks nothing.

    python benchmarks/paper_script.py --instruct I --base B --tuned T --output OUT
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

GRAFTED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load_model(folder: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("instruct", "base", "tuned", "output"):
        ap.add_argument(f"--{name}", required=True, type=Path)
    a = ap.parse_args()

    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    base, tuned, instruct = load_model(a.base), load_model(a.tuned), load_model(a.instruct)
    for name, w in instruct.items():
        if any(k in name for k in GRAFTED):
            instruct[name] = w + (tuned[name] - base[name])
    del base, tuned

    a.output.mkdir(parents=True, exist_ok=True)
    split = split_torch_state_dict_into_shards(instruct, max_shard_size="5GB")
    for file, names in split.filename_to_tensors.items():
        save_file({n: instruct[n].contiguous() for n in names}, str(a.output / file), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (a.output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for side in ("config.json", "generation_config.json"):
        if (a.instruct / side).exists():
            shutil.copyfile(a.instruct / side, a.output / side)


if __name__ == "__main__":
    main()
