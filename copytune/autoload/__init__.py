"""Zero-code activation: this folder holds a ``sitecustomize`` that patches the serving engine on import."""

from __future__ import annotations

import os
from collections.abc import Mapping

FOLDER = os.path.dirname(os.path.abspath(__file__))


def autoload_env(environ: Mapping[str, str], cache_path: str | None = None) -> dict[str, str]:
    """``environ`` with this folder first on ``PYTHONPATH`` (and ``COPYTUNE_CACHE`` set, if given): every Python
    process started with it loads copytune's ``sitecustomize``."""
    env = dict(environ)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and os.path.abspath(p) != FOLDER]
    env["PYTHONPATH"] = os.pathsep.join([FOLDER, *rest])
    if cache_path is not None:
        env["COPYTUNE_CACHE"] = str(cache_path)
    return env
