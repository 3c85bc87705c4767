"""adadpo-megatron: AdaDPO and the DPO family for megatron-core models."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"',
                    (HERE / "adadpo_megatron" / "__init__.py").read_text()).group(1)

setup(
    name="adadpo-megatron",
    version=VERSION,
    description="AdaDPO (arXiv 2605.28440) and the DPO family for megatron-core: "
                "tensor-, pipeline- and context-parallel preference training",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["adadpo_megatron", "adadpo_megatron.*"]),
    python_requires=">=3.12",
    install_requires=[
        "torch>=2.6",
        # Tested with 0.19.2 (see README); 0.17 and later need Python >= 3.12.
        "megatron-core>=0.19,<0.20",
        "pyyaml>=6",
        "datasets>=3",
        "transformers>=4.40",  # local Hugging Face tokenizers and chat templates
        "tqdm>=4.60",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        "psutil>=5",  # megatron-core's distributed checkpoint writer imports it lazily
    ],
    extras_require={
        # trl: the peer the loss family is compared with (tests/mcore/test_trl_parity.py),
        # pinned to the minor release whose trainer internals that test drives
        # peft: loads the PEFT adapter directories adadpo-export-hf --peft writes
        # wandb: train.wandb's logging, tested offline (tests/training/test_wandb.py)
        # pytest-xdist: the suite runs its files on two workers (README's test command)
        "test": ["pytest>=8", "pytest-xdist>=3.5", "trl>=1.16,<1.17", "peft>=0.17",
                 "wandb>=0.19"],
        "wandb": ["wandb>=0.19"],
        # GPU machines only. NVIDIA Apex is used where already installed (NGC containers);
        # the PyPI package named "apex" is unrelated and must never be added here.
        "te": ["transformer-engine[pytorch]>=2.6"],
    },
    entry_points={
        "console_scripts": [
            "adadpo-train=adadpo_megatron.training.cli:train_main",
            "adadpo-precompute-reference=adadpo_megatron.training.cli:precompute_main",
            "adadpo-plot=adadpo_megatron.training.reporting.plots:main",
            "adadpo-summary=adadpo_megatron.training.reporting.summary:main",
            "adadpo-import-hf=adadpo_megatron.training.huggingface.cli:import_main",
            "adadpo-export-hf=adadpo_megatron.training.huggingface.cli:export_main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3.12",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
