"""Child processes end with the process that started them.

A batch or a server stopped with ``kill PID`` (or ``kill -9``, or a crash) does not take its spawned
children with it: a process pool's workers finish the slides already handed to them, then wait for ever;
the DataLoader workers of extract live on under their fork server; the service's worker goes on taking
jobs. Each such child therefore watches the process it works for and ends as soon as that is gone. A
slide cut off this way is redone on the next run, as after any crash: outputs are written atomically,
and the kernel drops a dead process's lock.
"""

from __future__ import annotations

import logging
import os
import threading
import time

log = logging.getLogger(__name__)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process now holds the pid: ours is gone
        return False
    return True


def end_with(pid: int, every: float = 0.25) -> threading.Thread:
    """In a child process: a daemon thread that ends this process once process ``pid`` is gone. For the
    direct parent the test is that it is still our parent (a dead parent that is not yet reaped still
    answers signals); for a grandparent (a DataLoader worker forked by a fork server), that ``pid``
    exists."""
    direct = os.getppid() == pid

    def alive() -> bool:
        return os.getppid() == pid if direct else _exists(pid)

    def watch() -> None:
        while alive():
            time.sleep(every)
        log.warning("pid %d: the process it worked for (pid %d) is gone; it stops too", os.getpid(), pid)
        os._exit(0)

    watcher = threading.Thread(target=watch, name="wsi-mil-end-with", daemon=True)
    watcher.start()
    return watcher
