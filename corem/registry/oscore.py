"""What an OSCORE context must remember across restarts (RFC 8613 §7.5): which sender sequence
numbers corem has used, and whether the device's requests were ever accepted (then, after a
restart, the replay window is unknown and Echo re-establishes it; a context never used starts with
an empty window).

Rows are keyed by a hash of the whole context input (secret, salt, IDs, ID context): a nonce is a
function of exactly that, so a device removed and added again with the same keys keeps its
numbers, and new keys start at 0.  Numbers are reserved in blocks with one atomic statement, so
workers and nodes sharing the registry never take the same block.
"""

from __future__ import annotations

import hashlib

from ..errors import StorageUnavailable
from .db import Db
from .store import OscoreKeys

SCHEMA = """
CREATE TABLE IF NOT EXISTS oscore_state (
    context  TEXT PRIMARY KEY,
    seq_next INTEGER NOT NULL,
    used     INTEGER NOT NULL DEFAULT 0
);
"""


def fingerprint(keys: OscoreKeys) -> str:
    h = hashlib.sha256()
    for part in (keys.secret, keys.salt, keys.sender_id, keys.recipient_id, keys.id_context or b""):
        h.update(len(part).to_bytes(2, "big") + part)
    h.update(b"\x01" if keys.id_context is not None else b"\x00")
    return h.hexdigest()


class OscoreState:
    def __init__(self, db: Db) -> None:
        self.db = db
        db.schema(SCHEMA)

    def reserve(self, context: str, n: int) -> int:
        """The first of `n` sender sequence numbers now reserved for this process."""
        try:
            row = self.db.execute(
                "INSERT INTO oscore_state (context, seq_next) VALUES (?, ?) ON CONFLICT (context) "
                "DO UPDATE SET seq_next = oscore_state.seq_next + ? RETURNING seq_next", (context, n, n)).fetchone()
        except self.db.Error as e:  # no number may be used that is not stored first
            raise StorageUnavailable(f"storage: oscore sequence numbers: {e}") from None
        return int(row[0]) - n

    def used(self, context: str) -> bool:
        row = self.db.execute("SELECT used FROM oscore_state WHERE context = ?", (context,)).fetchone()
        return bool(row and row[0])

    def mark_used(self, context: str) -> None:
        """The context's first accepted request: from now on a restart must not trust an empty window."""
        try:
            self.db.execute("INSERT INTO oscore_state (context, seq_next, used) VALUES (?, 0, 1) "
                            "ON CONFLICT (context) DO UPDATE SET used = 1", (context,))
        except self.db.Error as e:
            raise StorageUnavailable(f"storage: oscore state: {e}") from None
