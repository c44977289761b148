"""Masking of secrets in URLs: the one place that decides what a log line may show.

Passwords come from the environment or the URL (DESIGN section 7); every message, log line and
``repr`` that mentions a URL goes through here first.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit

__all__ = ["mask_url"]

_SECRET_PARAMS = frozenset({"password", "ssl_password", "passwd", "pwd", "sslpassword"})


def mask_url(url: str) -> str:
    """``url`` with the password of its user part and of ``password=``-like query options
    replaced by ``***``; ``<unparsable url>`` when it cannot be parsed at all."""
    if "://" not in url:
        return "<unparsable url>"  # cannot tell where a password would be: show nothing
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            user_info, _, host = netloc.rpartition("@")
            user = user_info.split(":", 1)[0]
            netloc = f"{user}:***@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(k.lower() in _SECRET_PARAMS for k, _ in pairs):
                query = urlencode(
                    [(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in pairs],
                    safe="*/",
                )
        if netloc == parts.netloc and query == parts.query:
            return url
        tail = f"?{query}" if query else ""
        tail += f"#{parts.fragment}" if parts.fragment else ""
        return f"{parts.scheme}://{netloc}{parts.path}{tail}"
    except ValueError:
        return "<unparsable url>"
