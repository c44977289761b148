"""A real Redis client that lets a test act at a named point of the conversation with the server.

featcache sends its commands already packed (``RedisStore._round_trip``), so a test that needs
"right before this MGET goes out" or "right after its answer came back" hooks the connection,
where every command passes, not ``Redis.execute_command``. Nothing is faked: the commands go to
the real server and the replies are the server's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import redis

__all__ = ["WireHooks", "command_names", "hooked_client", "is_command"]

#: ``before_send(packed)`` and ``after_reply(packed, reply)``: ``packed`` is the list of RESP
#: commands of one send, ``reply`` one reply read after it.
BeforeSend = Callable[[Sequence[bytes]], None]
AfterReply = Callable[[Sequence[bytes], Any], None]


class WireHooks:
    """What the connections of one ``hooked_client`` call; set the fields from the test."""

    def __init__(self) -> None:
        self.before_send: BeforeSend | None = None
        self.after_reply: AfterReply | None = None


class _HookedConnection(redis.Connection):
    hooks: WireHooks
    _sent: Sequence[bytes] = ()

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        packed = [command] if isinstance(command, bytes | str) else list(command)
        self._sent = [p.encode() if isinstance(p, str) else bytes(p) for p in packed]
        if self.hooks.before_send is not None:
            self.hooks.before_send(self._sent)
        super().send_packed_command(command, check_health)

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        reply = super().read_response(*args, **kwargs)
        if self.hooks.after_reply is not None:
            self.hooks.after_reply(self._sent, reply)
        return reply


class _HookedPool(redis.ConnectionPool):
    hooks: WireHooks

    def make_connection(self) -> Any:
        conn = super().make_connection()
        conn.hooks = self.hooks
        return conn


def hooked_client(url: str) -> tuple[redis.Redis, WireHooks]:
    """A client of the server at ``url`` whose connections call the returned hooks."""
    pool = _HookedPool.from_url(url, connection_class=_HookedConnection)
    pool.hooks = WireHooks()
    return redis.Redis(connection_pool=pool), pool.hooks


def is_command(packed: bytes, name: str, args: Sequence[str | bytes] | None = None) -> bool:
    """Whether ``packed`` is the command ``name`` (with exactly ``args``, when given)."""
    parts = packed.split(b"\r\n")
    # *N, $len, NAME, $len, arg1, ...: the name is the third element, the args every other one
    if len(parts) < 3 or parts[2].upper() != name.upper().encode():
        return False
    if args is None:
        return True
    got = parts[4:-1:2]
    return got == [a.encode() if isinstance(a, str) else a for a in args]


def command_names(packed: Sequence[bytes | str | memoryview]) -> list[str]:
    """The names of the commands in one send, in order (redis-py may split a command over
    several buffers or join several into one; featcache sends one buffer per command)."""
    data = b"".join(p.encode() if isinstance(p, str) else bytes(p) for p in packed)
    names: list[str] = []
    pos = 0
    while pos < len(data):
        end = data.index(b"\r\n", pos)
        assert data[pos:pos + 1] == b"*", f"not a RESP array at byte {pos}"
        count = int(data[pos + 1:end])
        pos = end + 2
        for i in range(count):
            end = data.index(b"\r\n", pos)
            size = int(data[pos + 1:end])
            if i == 0:
                names.append(data[end + 2:end + 2 + size].decode().upper())
            pos = end + 2 + size + 2
    return names
