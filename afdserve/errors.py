"""Typed errors shared by every layer.

`UserInputError` marks bad input at a boundary (CLI flag, HTTP body, model file, trace): front
ends turn it into one clear line (CLI, exit 2) or a 400 (HTTP), never a traceback. It subclasses
ValueError so plain Python callers can catch it the usual way.
"""

from __future__ import annotations


class AfdserveError(Exception):
    """Base of every error afdserve raises on purpose."""


class UserInputError(AfdserveError, ValueError):
    """Bad input from a user: a flag, a request, a file. The message says what and why."""


class StateConflict(UserInputError):
    """A valid request the group's state refuses now (no free attention slot, a slot taken, a
    worker that still holds requests): HTTP 409, CLI exit 2."""


class ModelLoadError(UserInputError):
    """A model directory that cannot be loaded: missing, unsupported, corrupt or truncated."""


class ProtocolError(AfdserveError):
    """A malformed wire frame. Receivers log it, drop the frame and keep serving."""


class TransportTimeout(AfdserveError, TimeoutError):
    """A wait across workers passed its deadline (a peer is slow or dead)."""


class TransportClosed(AfdserveError):
    """The transport was shut down while a caller was waiting on it."""
