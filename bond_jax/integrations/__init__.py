"""Plug-ins that put BOND into other trainers; each needs its own extra (`pip install "bond_jax[tunix]"`)."""
