"""numba compilation that works wherever the package is installed, and says when it is slow.

numba's on-disk cache is an optimisation, never a requirement. ``jit`` asks for
``cache=True``; numba then stores compiled code beside the sources, else in the user cache
directory (``~/.cache/numba``, or ``NUMBA_CACHE_DIR`` when set). Where none of those is
writable (a read-only install run by a user with a read-only home), numba refuses to cache
and ``jit`` compiles in memory instead, with one log line per process.

The first call of a kernel for a new argument type loads it from that cache (0.01-0.3 s)
or compiles it (seconds, more under load). ``announce_compile`` logs one line when such a
call is still busy after ``NOTICE_AFTER`` seconds, so a command-line user knows why.
"""
import contextlib
import logging
import threading

log = logging.getLogger("transposable.solvers")

#: Seconds a first call may take before the "compiling" line is logged.
NOTICE_AFTER = 1.5

_uncached = []  # names of kernels compiled in memory only (no writable cache directory)


def jit(**options):
    """``numba.njit(cache=True, **options)``, or without the cache where numba has no
    writable directory for it."""
    from numba import njit

    def decorate(function):
        try:
            return njit(cache=True, **options)(function)
        except RuntimeError as exc:  # "cannot cache function ...: no locator available"
            if "cannot cache" not in str(exc):
                raise
            if not _uncached:
                log.warning("no writable cache directory for the compiled solvers (package directory, "
                            "~/.cache/numba and NUMBA_CACHE_DIR are read-only or unset): they are compiled "
                            "in memory in every new process; set NUMBA_CACHE_DIR to a writable directory "
                            "to keep them")
            _uncached.append(function.__name__)
            return njit(cache=False, **options)(function)

    return decorate


def is_compiled(dispatcher, args):
    """Whether ``dispatcher`` already holds code for these argument types in this process."""
    from numba import typeof

    try:
        signature = tuple(typeof(arg) for arg in args)
    except ValueError:  # a type numba cannot name: let the call itself say so
        return True
    return signature in dispatcher.overloads


@contextlib.contextmanager
def announce_compile(what, needed=True):
    """Log one line if the block (a kernel's first call) is still running after
    ``NOTICE_AFTER`` seconds; ``needed=False`` skips the timer (code already compiled)."""
    if not needed:
        yield
        return
    where = ("in memory: no writable cache directory, see NUMBA_CACHE_DIR" if _uncached
             else "once: later runs load them from numba's cache")
    timer = threading.Timer(NOTICE_AFTER, log.warning, (f"compiling solver kernels for {what} ({where})",))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
