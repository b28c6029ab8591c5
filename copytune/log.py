"""Operational messages under the ``copytune`` logger, for the operator of a serving process.

INFO: activation (engine, patched classes, cache and its size), one line per tuned key (winner, speedup), start-up
tuning. WARNING: problems, once per cause: a serving process meets the same unusable cache row or failing candidate
on every step, and one line says it. ``COPYTUNE_LOG_LEVEL`` (DEBUG, INFO, WARNING, ...) sets the level at import and
gives the logger its own stderr handler when nothing else would print its records; the CLI's ``-v``/``-q`` do the
same. Otherwise records go wherever the host application's logging sends them.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

logger = logging.getLogger("copytune")
LEVEL_ENV = "COPYTUNE_LOG_LEVEL"
FORMAT = "%(asctime)s %(levelname)s %(message)s"  # messages start with "copytune"

_seen: set[str] = set()
_seen_lock = threading.Lock()


def warn_once(cause: str, message: str, *args) -> bool:
    """``logger.warning(message, *args)`` the first time ``cause`` is seen in this process; True if it printed."""
    with _seen_lock:
        if cause in _seen:
            return False
        _seen.add(cause)
    logger.warning(message, *args)
    return True


def forget_causes() -> None:
    """Let every cause warn again (tests; a long-lived process after an operator fixed things)."""
    with _seen_lock:
        _seen.clear()


def configure(level: int | str | None = None, *, own_handler: bool = False) -> None:
    """Set the logger's level (``level``, else ``$COPYTUNE_LOG_LEVEL``; nothing when neither) and make sure its
    records are printed: a stderr handler of its own unless the application configured logging itself (or
    ``own_handler``: the command line, which owns its process's output)."""
    level = level if level is not None else os.environ.get(LEVEL_ENV)
    if level is None or level == "":
        return
    if isinstance(level, str):
        name = level.strip().upper()
        level = logging.getLevelName(name) if not name.isdigit() else int(name)
        if not isinstance(level, int):
            raise ValueError(f"{LEVEL_ENV}: unknown level {name!r} (DEBUG, INFO, WARNING, ERROR)")
    logger.setLevel(level)
    if not logger.handlers and (own_handler or not logging.getLogger().handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, "%H:%M:%S"))
        logger.addHandler(handler)


def configure_from_env() -> None:
    """``configure()`` at import, never fatal: a mistyped level is reported, not raised into the importer."""
    try:
        configure()
    except ValueError as exc:
        logging.getLogger("copytune").warning("%s; logging left as it was", exc)
