"""Put first on ``PYTHONPATH`` by ``copytune run``: patches sglang's DSA/NSA backend the moment the engine imports
it, in this process and every process it spawns, with no change to the engine or the launch script.

Standard library only until the engine's backend module is imported: every Python process started under
``copytune run`` (pip, compilers' helpers) pays one meta-path lookup and nothing else.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

ENGINE_MODULES = ("sglang.srt.layers.attention.dsa_backend", "sglang.srt.layers.attention.nsa_backend")


class _PatchAfterExec(importlib.abc.Loader):
    """Runs the engine's module as its own loader would, then lets copytune patch it."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _install()

    def __getattr__(self, name):  # get_source, is_package, ... as the wrapped loader answers them
        return getattr(self._loader, name)


class _EngineFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in ENGINE_MODULES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _PatchAfterExec(spec.loader)
                return spec
        return None


def _install():
    try:
        from copytune import nsa

        patched = nsa.install()
        what = ", ".join(nsa.installed()) if patched else "nothing (see the copytune log)"
        print(f"copytune: active in process {os.getpid()}: patched {what}", file=sys.stderr, flush=True)
    except Exception as exc:  # noqa: BLE001 - the engine must start whatever copytune's state
        print(f"copytune: not active ({type(exc).__name__}: {exc})", file=sys.stderr, flush=True)


def _chain_next_sitecustomize():
    """Python imports only the first ``sitecustomize`` on the path: run the one this folder shadows, as ``site``
    would (found past this folder, executed as ``sitecustomize``; whatever it does to ``sys.path`` stays)."""
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.machinery.PathFinder.find_spec(
        "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != here])
    if spec is None or spec.loader is None:
        return
    ours = sys.modules.get("sitecustomize")
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - reported as site.py reports a failing sitecustomize
        print(f"Error in sitecustomize; set PYTHONVERBOSE for traceback:\n{type(exc).__name__}: {exc}",
              file=sys.stderr)
    finally:
        if ours is not None:
            sys.modules["sitecustomize"] = ours


if not any(isinstance(f, _EngineFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _EngineFinder())
_chain_next_sitecustomize()
