"""Errors every layer may raise and the edges answer alike."""

from __future__ import annotations


class NewerFormat(ValueError):
    """Data a newer corem wrote (a data dir's format, a table's schema version): this corem does
    not open it, and says so in one line naming both versions (corem/datadir.py)."""


class StorageUnavailable(RuntimeError):
    """A write the disk refused (full, failing, locked too long): nothing was stored, and the same
    request may work later.  CoAP answers 5.03 with Max-Age, HTTP 503; neither is a 5.00/500, for
    it is no bug, and no task ends on it."""
