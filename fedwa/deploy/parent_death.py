"""Children that end with the process that started them (Linux's parent-death signal).

``fedwa deploy`` stops every process it started on any exit it sees; ``kill -9`` of the
launcher is the one it cannot see. A child started with :func:`die_with_parent` as its
``preexec_fn`` gets SIGTERM from the kernel when the launcher dies, however it dies.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when this process dies (Linux).

    ``stop()`` and the signal handlers stop every child on any exit the launcher sees; this
    covers the one it cannot see, ``kill -9`` of the launcher itself. The children's own
    children follow: Flower starts them with ``--parent-pid`` and they exit with their parent.
    The signal goes when the *thread* that started the child ends, so children are started
    from the main thread. Elsewhere than Linux there is no such signal: None.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before the fork

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the launcher died before prctl: nobody would signal us
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec
