"""Backends for tests: a forwarding wrapper that counts (or forbids) the calls made through the
interface, attached to a model the way load_model attaches its backend."""

from __future__ import annotations

import contextlib
from collections import Counter

from whisper_mlx.backends import backend_for


class CountingBackend:
    """Forwards every interface call to a real backend, counting them; `forbid` names calls that fail."""

    def __init__(self, inner, forbid: tuple[str, ...] = ()):
        self.inner = inner
        self.name, self.xp = inner.name, inner.xp
        self.calls: Counter = Counter()
        self.forbid = set(forbid)

    def __getattr__(self, name):
        method = getattr(self.inner, name)
        if not callable(method):
            return method

        def forwarded(*args, **kwargs):
            if name in self.forbid:
                raise AssertionError(f"backend.{name} must not be called here")
            self.calls[name] += 1
            return method(*args, **kwargs)

        return forwarded


@contextlib.contextmanager
def attached(model, backend):
    """Make `backend` the model's backend for the duration (as load_model would have chosen it)."""
    previous = backend_for(model)
    model.backend = backend
    try:
        yield backend
    finally:
        model.backend = previous


def counting(model, forbid: tuple[str, ...] = ()):
    """attached(model, CountingBackend(its current backend))."""
    return attached(model, CountingBackend(backend_for(model), forbid))
