"""Errors a user can fix: the CLI prints them as one line and exits non-zero."""

from __future__ import annotations

import operator


class UserError(ValueError):
    """Bad input or settings; the message says what to change.

    A ``ValueError``, so that settings objects validating their fields (``GPTQSettings``)
    raise one kind of error whichever rule refused them."""


def check_counts(**counts: object) -> None:
    """The rule for every count (windows, samples, tokens per window, batch size, search
    steps, bytes): a positive integer. Keywords are the settings' names, reported as the
    CLI flag (``batch_size`` -> ``--batch-size``)."""
    for name, value in counts.items():
        try:
            ok = not isinstance(value, bool) and operator.index(value) > 0
        except TypeError:
            ok = False
        if not ok:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
