"""Error classes: each also subclasses the builtin a caller would expect to catch."""


class RegsegError(Exception):
    """Base of every error regseg raises on purpose."""


class InputError(RegsegError, ValueError):
    """Bad file, bad array, bad config, bad command-line value."""


class StreamError(RegsegError, ConnectionError):
    """A source or sink could not connect, or its peer broke the protocol beyond recovery."""


class EngineError(RegsegError, RuntimeError):
    """A model or backend could not be built, loaded or run."""
