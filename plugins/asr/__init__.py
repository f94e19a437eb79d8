"""The ASR plugin process: faster-whisper behind a framed socket, one job at a time.

This package is the only code that imports faster-whisper, ctranslate2 or PyAV; the agent starts it as
``python -m plugins.asr`` and never imports it.
"""
