"""The language codes Whisper knows, and the one-line messages for a language that is not one of them or that a
model cannot serve. Kept here so the agent, the CLI and the scheduler check languages without importing
faster-whisper (only the plugin process may load it)."""

from __future__ import annotations

#: faster_whisper.tokenizer._LANGUAGE_CODES (faster-whisper 1.x); a test keeps the two equal.
WHISPER_LANGUAGES: tuple[str, ...] = (
    "af", "am", "ar", "as", "az", "ba", "be", "bg", "bn", "bo", "br", "bs", "ca", "cs", "cy", "da", "de", "el",
    "en", "es", "et", "eu", "fa", "fi", "fo", "fr", "gl", "gu", "ha", "haw", "he", "hi", "hr", "ht", "hu", "hy",
    "id", "is", "it", "ja", "jw", "ka", "kk", "km", "kn", "ko", "la", "lb", "ln", "lo", "lt", "lv", "mg", "mi",
    "mk", "ml", "mn", "mr", "ms", "mt", "my", "ne", "nl", "nn", "no", "oc", "pa", "pl", "ps", "pt", "ro", "ru",
    "sa", "sd", "si", "sk", "sl", "sn", "so", "sq", "sr", "su", "sv", "sw", "ta", "te", "tg", "th", "tk", "tl",
    "tr", "tt", "uk", "ur", "uz", "vi", "yi", "yo", "zh", "yue",
)
_KNOWN = frozenset(WHISPER_LANGUAGES)
#: The multilingual model that ships offline, named in the fix for an English-only model.
MULTILINGUAL_MODEL = "base"
NOT_A_CODE = "not a language code; use a code such as en, zh"


def is_language_code(value: str) -> bool:
    """Whether ``value`` is exactly one of Whisper's codes (lowercase, as on the wire)."""
    return value in _KNOWN


def english_only(model: str) -> bool:
    """Whether an offline or hub model name is an English-only Whisper model (``tiny.en``, ``base.en``, ...)."""
    return model.endswith(".en")


def english_only_message(model: str, language: str) -> str:
    """The one line for a language an English-only model cannot serve, naming the fix."""
    return (f"model {model} serves English only; for {language!r} use a multilingual model: "
            f"asr.model: {MULTILINGUAL_MODEL} (or --model {MULTILINGUAL_MODEL})")
