"""mmkit's exceptions. The library raises these; only `cli/` turns them into exit codes."""

import contextlib

ECHO_LIMIT = 200  # characters of a user's value that an error message repeats


def shown(value, limit: int = ECHO_LIMIT) -> str:
    """A user's value as an error message echoes it: its text, cut to `limit` characters."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


class MmkitError(Exception):
    """Base class of every error mmkit raises on purpose."""

    exit_code = 1


class InputError(MmkitError):
    """The user's input is wrong (a model, a file, a name, a number): exit code 2.

    The message is one paragraph that names the cause and the fix.
    """

    exit_code = 2


class RuntimeFailure(MmkitError):
    """The input was fine but the work failed (out of memory, a library error): exit code 1."""

    exit_code = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interruption so that every cleanup runs: exit code 143."""


@contextlib.contextmanager
def signals_held():
    """Hold Ctrl-C and SIGTERM over the few statements inside (database writes that must land
    together): a signal arriving meanwhile is handled as its own handler says once they end.
    Off the main thread, where Python runs no signal handler, nothing is held."""
    import signal

    caught = []
    try:
        previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                    for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if caught:
            handler = previous[caught[0]]
            if callable(handler):
                handler(caught[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(caught[0])


def interrupted_by(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C / SIGTERM behind an exception: itself, or one it was raised while handling
    (a cleanup that fails after the signal, such as a database session closed mid-commit,
    must not turn an interruption into an error exit)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__context__
    return None
