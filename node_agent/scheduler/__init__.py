"""The reference scheduler (protocol version 1): in-memory, one site, embedded or standalone.

``state`` is the pure state machine, ``server`` its HTTP face, ``schemas`` the wire shapes the
agent's client shares, ``metrics`` its Prometheus series. See docs/protocol.md.
"""

from .server import STATE_KEY, Running, create_app, serve, start_scheduler
from .state import SchedulerState

__all__ = ["STATE_KEY", "Running", "SchedulerState", "create_app", "serve", "start_scheduler"]
