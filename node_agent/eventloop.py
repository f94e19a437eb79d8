"""The event loop every command runs on: uvloop where it is installed (Linux and macOS), else asyncio's own.

uvloop (libuv under asyncio's API; asyncpg's authors') does the socket work of the loop in C. The scheduler is
event-loop bound: on PostgreSQL its CPU per job went from 4.4 ms to 3.4 ms with nothing else changed
(docs/benchmarks.md), and the agent's HTTP and plugin sockets run on the same loop. Nothing in this project
depends on which loop it is; Windows, where uvloop does not exist, gets asyncio's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the fastest loop available."""
    try:
        import uvloop
    except ImportError:  # not installed (Windows): asyncio's loop does the same, a little slower
        return asyncio.run(main)
    return uvloop.run(main)

