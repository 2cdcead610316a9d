"""One registry idiom for every pluggable kind of thing: backends, export formats, planners, tasks and
calibration sources.

A :class:`Registry` maps names to members; members are pydantic models (validated when they are made, so a
malformed registration fails at import, not mid-run), and each kind's model carries everything the rest of
quantlab asks about a member, so no code outside the member's own module tests its name.

    BACKENDS = Registry("quantization backend")
    BACKENDS.register(Backend(name="rtn", fn=rtn_backend, bits=(1, ..., 8), ...))
    BACKENDS.get("gptq")        # a member, or UnknownName listing the valid names (with a suggestion)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from quantlab.core.errors import UserError, did_you_mean


class Member(BaseModel):
    """Base of every registry member: a validated, frozen record with a ``name`` (callables allowed)."""

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    name: str


T = TypeVar("T", bound=Member)


class UnknownName(UserError, KeyError):
    """A name no member of a registry has (a ``KeyError`` too, for code that looks names up)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0] if self.args else ""


class Registry(Generic[T]):
    """Name -> member, in registration order."""

    def __init__(self, kind: str):
        self.kind = kind
        self._members: dict[str, T] = {}

    def register(self, member: T) -> T:
        """Add ``member``; a second member with the same name raises ``ValueError``."""
        if not isinstance(member, Member):
            raise TypeError(f"{self.kind} registry: {member!r} is not a registry member")
        if member.name in self._members:
            raise ValueError(f"{self.kind} {member.name!r} already registered")
        self._members[member.name] = member
        return member

    def remove(self, name: str) -> T:
        """Take ``name`` out (plugins that unload, tests that register a member for a while)."""
        return self._members.pop(name)

    def get(self, name: str) -> T:
        """The member called ``name``.

        Raises:
            UnknownName: listing the valid names, with the closest one when there is one.
        """
        try:
            return self._members[name]
        except KeyError:
            raise UnknownName(f"unknown {self.kind} {name!r}{did_you_mean(name, self._members)}; "
                              f"valid: {sorted(self._members)}") from None

    def names(self) -> list[str]:
        return list(self._members)

    def values(self) -> list[T]:
        return list(self._members.values())

    def items(self) -> list[tuple[str, T]]:
        return list(self._members.items())

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __getitem__(self, name: str) -> T:
        return self.get(name)
