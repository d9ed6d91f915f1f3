from setuptools import Extension, find_packages, setup

# The one-pass CPU kernels (shadowgraft/native.py). Optional: without a C
# compiler the install still succeeds and the TorchScript kernels run.
# -ffp-contract=off: no fused multiply-adds, so every CPU gets the same bits.
native = Extension(
    "shadowgraft._native",
    sources=["shadowgraft/_native.c"],
    depends=["shadowgraft/_sums.h"],
    extra_compile_args=["-O3", "-ffp-contract=off", "-Wno-psabi"],
    optional=True,
)

setup(
    name="shadowgraft",
    version="0.1.0",
    description="Stream-graft fine-tuning deltas and LoRA adapters onto instruct checkpoints (Shadow-FT).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["shadowgraft", "shadowgraft.*"]),
    ext_modules=[native],
    python_requires=">=3.10",
    install_requires=[
        "safetensors>=0.4",
        "numpy>=1.24",
        # The CPU or CUDA build is the installer's choice; the Makefile pins it.
        "torch>=2.1",
        "huggingface-hub>=0.24",
        "rich>=13",
        "click>=8.1",
    ],
    extras_require={
        "plot": ["matplotlib>=3.7"],
        "train": ["transformers>=4.45", "peft>=0.13", "tokenizers>=0.19"],
        "dev": ["pytest>=7", "hypothesis>=6"],
    },
    entry_points={"console_scripts": ["shadowgraft=shadowgraft.cli:console"]},
)
