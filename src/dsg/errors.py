"""User-facing errors.

Every mistake a user can make (a missing file, a wrong field, a guardrail fitted for another SAE) raises
`DSGError` with one sentence that names the file, field or value and says what was expected. The CLI prints
that sentence and exits non-zero; library callers can catch the one class.
"""


class DSGError(Exception):
    """A problem with the user's input, described in one sentence."""
