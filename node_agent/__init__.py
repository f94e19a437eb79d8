"""node-agent: the node side of a speech-recognition cluster."""

__version__ = "0.1.0"
