"""The package list, computed so that a new subpackage or config group needs no edit: every package under
kdprune_cli/, and conf/ (at the repository root, where a checkout runs it from) shipped as kdprune_cli.conf
with each of its group folders; conf/local (one machine's paths) stays out. The rest is in pyproject.toml."""
from setuptools import find_namespace_packages, find_packages, setup

GROUPS = find_namespace_packages("conf", exclude=["local", "local.*"])
setup(packages=find_packages(include=["kdprune_cli", "kdprune_cli.*"])
      + ["kdprune_cli.conf"] + [f"kdprune_cli.conf.{g}" for g in GROUPS])
