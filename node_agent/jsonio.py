"""JSON as this project writes it, in HTTP answers and on the command line: real UTF-8, so a Mandarin transcript
reads as 你好 in a terminal rather than \\u4f60\\u597d."""

from __future__ import annotations

import json
from typing import Any, Mapping

from aiohttp import web


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` keeping non-ASCII characters as they are.

    A lone surrogate (a client may send one as a ``\\ud800`` escape) cannot be encoded as UTF-8, so text holding
    one falls back to ASCII escapes: still valid JSON, and no error on the way out."""
    text = json.dumps(obj, ensure_ascii=False, **kwargs)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, ensure_ascii=True, **kwargs)
    return text


def json_response(data: Any, *, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """``web.json_response`` with real UTF-8 (aiohttp's default escapes everything outside ASCII);
    Content-Type ``application/json; charset=utf-8``."""
    return web.Response(body=dumps(data).encode("utf-8"), status=status, headers=headers, content_type="application/json",
                        charset="utf-8")
