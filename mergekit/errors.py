"""The one error type users see."""

from __future__ import annotations


class MergeError(ValueError, RuntimeError):
    """A problem the user can fix, reported as ``<where>: <what>; <what to do>``.

    ``exit_code`` is 2 for recipe and usage errors (found before any weight is read)
    and 1 for failures while merging. It is a ``ValueError`` and a ``RuntimeError``, as
    mergekit 0.1.x's recipe validators and reference parser raise them, so scripts written
    for it catch it with ``except ValueError`` or ``except RuntimeError``.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def usage_error(where: str, what: str, fix: str = "") -> MergeError:
    return MergeError(_join(where, what, fix), exit_code=2)


def merge_failure(where: str, what: str, fix: str = "") -> MergeError:
    return MergeError(_join(where, what, fix), exit_code=1)


def _join(where: str, what: str, fix: str) -> str:
    text = f"{where}: {what}" if where else what
    return f"{text}; {fix}" if fix else text
