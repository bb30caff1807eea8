"""`Registry`: the one way a package registers named things (organism builders, judges, auditor
policies, strategies, tools, verbalize sources). A dict (look-ups, `in`, iteration in
registration order) whose `register` refuses a name already taken by something else.

Imports nothing heavy: every package can use it at import time.
"""

from __future__ import annotations

from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """Named items of one `kind` ("builder", "tool", ...). `register(name, item)` adds `item`; a
    name already taken raises `ValueError` ("<kind> <name> is already registered"), except, when
    `same_ok` (the default), for the very same item registered again (a module imported twice)."""

    def __init__(self, kind: str, *, same_ok: bool = True):
        super().__init__()
        self.kind = kind
        self.same_ok = same_ok

    def register(self, name: str, item: T) -> T:
        if name in self:
            old = self[name]
            if not (self.same_ok and (old is item or old == item)):
                raise ValueError(f"{self.kind} {name!r} is already registered")
        self[name] = item
        return item

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
