"""Process lifecycle: a worker that exits when the process that started it dies (e.g. a killed torchrun)."""

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_parent = os.getppid()  # the parent this process started under, recorded as early as pico is imported


def _record_parent() -> None:
    global _parent
    _parent = os.getppid()


os.register_at_fork(after_in_child=_record_parent)  # a forked child's parent is the forking process


def die_with_parent() -> bool:
    """On Linux, get SIGTERM when the parent dies (also if it died already); elsewhere a no-op
    returning False.

    The kernel signals when the parent *thread* that started this process exits (torchrun's agent starts
    its workers from its main thread). A parent that died before this call is detected by comparing the
    parent pid with the one recorded when this module was imported (or at fork), and answered with the
    same SIGTERM; a parent that died before pico was imported goes unnoticed.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if os.getppid() != _parent:  # orphaned before prctl took effect: nothing would ever send the signal
        os.kill(os.getpid(), signal.SIGTERM)
    return True
