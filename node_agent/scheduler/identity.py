"""Who owns what, in the store: nodes' secrets, and the client each job was submitted by.

A node's first registration is given one, the store keeps its hash
(``nodes.secret_hash``), and from then on only a request with that secret may act as the node (``auth.NodeFence``
checks node routes; registration checks here, inside its own transaction). Kept in the store, every replica
checks the same secret."""

from __future__ import annotations

import hmac

from .auth import new_node_secret, node_refusal, secret_hash
from .db import Tx
from .errors import Forbidden
from .transitions import StorePart


async def check_registration(tx: Tx, node_id: str, secret: str | None, fenced: bool) -> None:
    """Refuse (``Forbidden``, nothing written) a registration as ``node_id`` without its secret, where the
    scheduler fences nodes: registering again releases what the node held, so it is the node's alone."""
    if not fenced:
        return
    stored = await tx.fetchval("SELECT secret_hash FROM nodes WHERE node_id = $1", node_id)
    if stored is not None and (secret is None or not hmac.compare_digest(stored, secret_hash(secret))):
        raise Forbidden(node_refusal(node_id, secret is not None))


async def issue_secret(tx: Tx, node_id: str, secret: str | None, fenced: bool) -> str | None:
    """After the registration's write: a new secret for a node that has none (its first registration, or one from
    before secrets existed), else None. Two first registrations of one id racing: the first one's secret stays,
    and where nodes are fenced the other is refused (its transaction, refresh included, is rolled back)."""
    fresh = new_node_secret()
    if await tx.execute("UPDATE nodes SET secret_hash = $2 WHERE node_id = $1 AND secret_hash IS NULL",
                        node_id, secret_hash(fresh)):
        return fresh
    if fenced:
        await check_registration(tx, node_id, secret, fenced)
    return None


class Identity(StorePart):
    """The fences' reads: which node a node request acts for and that node's secret hash; a job's client."""

    async def job_client(self, job_id: str) -> str | None:
        """The name of the client token ``job_id`` was submitted with (None: none, or no such job)."""
        return await self.engine.run(lambda tx: tx.fetchval("SELECT client FROM jobs WHERE job_id = $1", job_id))

    async def node_secret(self, *, node_id: str | None = None, lease_id: str | None = None,
                          job_id: str | None = None) -> tuple[str | None, str | None]:
        """(node id, its secret hash) of the node named, of the node holding ``lease_id``, or of the node
        ``job_id`` is assigned to; (None, None) where there is none."""
        if node_id is not None:
            sql, key = "SELECT node_id, secret_hash FROM nodes WHERE node_id = $1", node_id
        elif lease_id is not None:
            sql, key = ("SELECT l.node_id, n.secret_hash FROM leases l LEFT JOIN nodes n ON n.node_id = l.node_id "
                        "WHERE l.lease_id = $1"), lease_id
        elif job_id is not None:
            sql, key = ("SELECT j.node_id, n.secret_hash FROM jobs j LEFT JOIN nodes n ON n.node_id = j.node_id "
                        "WHERE j.job_id = $1"), job_id
        else:
            raise ValueError("node_secret needs node_id, lease_id or job_id")
        row = await self.engine.run(lambda tx: tx.fetchrow(sql, key))
        if row is None or row["node_id"] is None:
            return None, None
        return row["node_id"], row["secret_hash"]
