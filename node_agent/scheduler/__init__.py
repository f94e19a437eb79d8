"""The reference scheduler (protocol version 1): embedded or standalone, its state in one SQL store.

``rules`` decides (pure), ``sqlstore`` writes (SQLite file or memory, PostgreSQL; ``db`` the engines,
``migrations`` the schema), ``store`` declares the interface and opens one from ``scheduler.store``, ``server`` is
the HTTP face, ``schemas`` the wire shapes the agent's client shares, ``metrics`` its Prometheus series. See
docs/protocol.md. Nothing is imported here, so the agent's client can read ``schemas`` without loading the server.
"""
