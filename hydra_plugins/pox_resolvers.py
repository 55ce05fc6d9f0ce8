"""The project's OmegaConf resolvers, for DVC's own composition of conf/ (``dvc exp run -S``).

With ``[hydra] enabled`` in .dvc/config, DVC composes conf/ into params.yaml itself; before
that it imports the ``hydra_plugins.*`` modules under its ``hydra.plugins_path`` (by default
the repository root, where this file sits), the one place where project code runs in that
composition. There is no ``__init__.py`` on purpose: ``hydra_plugins`` is a namespace package
that the installed Hydra plugins (the Optuna sweeper) share.
"""

from pathlib import Path

from omegaconf import OmegaConf

from pox_pipeline.common.params import PATH_RESOLVER, register_path_resolver

# `${pox.abspath:...}` starts at the project this file belongs to. A composition that registered
# it already (pox_pipeline.common.config, for the conf/ it was given) keeps its own project.
if not OmegaConf.has_resolver(PATH_RESOLVER):
    register_path_resolver(Path(__file__).resolve().parents[1])
