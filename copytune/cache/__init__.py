"""Persistence of tuned winners: the SQLite store (and, later, export/import bundles)."""
