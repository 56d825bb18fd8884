"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback."""

from __future__ import annotations

from typing import Any


class FedwaError(Exception):
    """Base class for errors caused by input (config, data, files), not by a bug."""


class ConfigError(FedwaError):
    """A run-config key holds a value that is not allowed.

    The message always names the key, the value and what is allowed.
    """

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config key '{key}' = {shown(value)} is not allowed: {allowed}")


#: Longest value :class:`ConfigError` shows whole; a 400-digit number or a 300-character name
#: would otherwise bury what is allowed at the end of the line.
SHOWN_CHARS = 120


def shown(value: Any) -> str:
    """``repr(value)``, shortened to its head and its length when longer than
    :data:`SHOWN_CHARS`."""
    text = repr(value)
    if len(text) <= SHOWN_CHARS:
        return text
    return f"{text[:SHOWN_CHARS - 40]}... ({len(text)} characters)"


class DataNotFoundError(FedwaError):
    """A dataset's files are not where fedwa looked; the message says how to get them."""


class AllClientsFailedError(FedwaError):
    """Every client of a round failed or sent an unusable reply; the run cannot go on."""


class TooFewRepliesError(AllClientsFailedError):
    """A round got fewer usable replies than ``min-available-clients`` (after its retries)."""


class CheckpointError(FedwaError):
    """A run folder cannot be resumed: no checkpoint, or one this run cannot continue."""


class UnsavableStateError(FedwaError):
    """A strategy holds state that a checkpoint cannot store as data (the run goes on, but
    cannot be resumed)."""


class RunFolderBusyError(FedwaError):
    """Another process holds the run folder's lock (it is running or resuming that run).

    The CLI exits with status 1, not 2: the command and its config are fine, the folder is in
    use now, and the same command works once the other run has ended.
    """


class UntrustedNodesError(FedwaError):
    """Nodes the run does not expect: more than ``num-clients``, or two on one partition id.

    Either could be a rogue SuperNode (or a node started twice); the run stops rather than
    average in a node it cannot tell from the real one.
    """
