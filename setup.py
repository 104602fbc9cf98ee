"""bond_jax: Best-of-N Distillation (BOND, J-BOND) in JAX/Flax."""

import re

import setuptools


def _version() -> str:
  """`__version__` from bond_jax/__init__.py, its one home (importing the package would need its dependencies)."""
  with open("bond_jax/__init__.py", encoding="utf-8") as f:
    return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


setuptools.setup(
    name="bond_jax",
    version=_version(),
    description="BOND (Best-of-N Distillation) and J-BOND for JAX/Flax: pure losses, estimators and a trainer.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["bond_jax", "bond_jax.*"]),
    package_data={"bond_jax": ["assets/*", "assets/**/*"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.10",
        "etils[epath]>=1.7",  # bond_jax.paths: every path of a run, local or in a bucket (orbax's own path type)
        "fsspec>=2024.2",  # bond_jax.paths: byte ranges of checkpoint files in a bucket
        "chex>=0.1.87",
        "ml-collections>=0.1.1",
        "absl-py>=2.0",
        "numpy>=1.26",
        "safetensors>=0.4",
        "transformers>=5.0",  # config.json is read through its config classes (rope_parameters, layer_types)
        "tensorflow-datasets>=4.9.7",
        "array-record>=0.5",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "matplotlib>=3.8",
    ],
    extras_require={
        # The GCS emulator the tests run bucket workdirs against (tests/gcs_emulator.py).
        "test": ["pytest>=8", "hypothesis>=6.100", "gcp-storage-emulator>=2026.7"],
        # gs:// workdirs, checkpoints and prompts (bond_jax.paths).
        "gcs": ["gcsfs>=2024.2"],
        # torch is only needed to check our converter against the PyTorch reference models.
        # 2.13 is the CPU wheel our CI installs; newer releases default to multi-GB CUDA builds.
        "hf": ["torch>=2.4,<2.14"],
        # Peers for benchmarks/train_step.py, each in its own virtual environment (benchmarks/README.md).
        "bench": ["trl>=1.16", "torch>=2.4,<2.14"],
        "bench-tunix": ["google-tunix>=0.1.7"],
        # bond_jax.integrations.tunix: BOND and J-BOND in Tunix's GRPO learner. Tunix pins safetensors<0.8, which
        # downgrades transformers, so CI tests it in a virtual environment of its own (README, "Use the losses").
        "tunix": ["google-tunix>=0.1.7"],
    },
)
