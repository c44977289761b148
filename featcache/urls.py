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
    scheme, rest = url.split("://", 1)
    rest = _mask_user_info(rest)
    try:
        parts = urlsplit(f"{scheme}://{rest}")
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(k.lower() in _SECRET_PARAMS for k, _ in pairs):
                query = urlencode(
                    [(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in pairs],
                    safe="*/",
                )
        if query == parts.query:
            return f"{scheme}://{rest}"
        tail = f"?{query}" if query else ""
        tail += f"#{parts.fragment}" if parts.fragment else ""
        return f"{parts.scheme}://{parts.netloc}{parts.path}{tail}"
    except ValueError:
        return "<unparsable url>"


def _mask_user_info(rest: str) -> str:
    """The part after ``scheme://`` with any password masked, however a parser would split it.

    Parsers disagree on an unencoded ``/``, ``?``, ``#`` or ``@`` in a password: SQLAlchemy ends
    the password at the first ``@`` (so ``u:ab/cd@host`` is password ``ab/cd``), ``urlsplit``
    ends the host part at the first ``/``. The user part is taken to end at the last ``@``
    before the first ``/`` that follows the first ``@``: that covers the password of either
    reading (it may hide more, never less)."""
    first_at = rest.find("@")
    if first_at < 0:
        return rest
    slash = rest.find("/", first_at)
    end = rest.rfind("@", 0, slash if slash >= 0 else len(rest))
    user_info, host = rest[:end], rest[end + 1 :]
    if ":" not in user_info:
        return rest
    return f"{user_info.split(':', 1)[0]}:***@{host}"
