"""User-facing errors. The CLI prints ``str(error)`` of any ``DpdmError`` and exits non-zero."""

from __future__ import annotations

import difflib


class DpdmError(Exception):
    """An error caused by user input (a file, a key, a name, an option value)."""


class UnknownComponentError(DpdmError, KeyError):
    """A component name that no installed plugin registered."""

    def __init__(self, kind: str, name: str, available: list[str]):
        self.kind, self.name, self.available = kind, name, sorted(available)
        close = difflib.get_close_matches(name, self.available, n=3, cutoff=0.5)
        msg = f"unknown {kind} {name!r}."
        if close:
            msg += " Did you mean " + " or ".join(repr(c) for c in close) + "?"
        listed = ", ".join(self.available) if self.available else "(none registered)"
        msg += f" Registered {kind}s: {listed}. Run `dpdm plugins` to see every component and the package that provides it."
        super().__init__(msg)

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class DuplicateComponentError(DpdmError):
    """Two plugins registered the same name for the same kind."""


class ConfigError(DpdmError):
    """One or more problems in a recipe, each naming its dotted key."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        head = f"invalid recipe {source}" if source else "invalid recipe"
        lines = [f"{head} ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


def did_you_mean(word: str, options) -> str:
    """`` Did you mean 'x'?`` or an empty string."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""
