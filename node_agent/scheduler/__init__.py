"""The reference scheduler (protocol version 1): embedded or standalone, its state in a store.

``rules`` decides (pure), ``state`` is the in-memory state machine, ``sqlstore`` the same on SQLite or PostgreSQL
(``db`` the engines, ``migrations`` the schema), ``store`` picks one from ``scheduler.store``, ``server`` is the HTTP
face, ``schemas`` the wire shapes the agent's client shares, ``metrics`` its Prometheus series. See docs/protocol.md.
"""

from .server import STORE_KEY, Running, create_app, serve, start_scheduler
from .state import SchedulerState

__all__ = ["STORE_KEY", "Running", "SchedulerState", "create_app", "serve", "start_scheduler"]
