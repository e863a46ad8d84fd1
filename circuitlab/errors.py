"""The one exception circuitlab raises for anything a user can fix."""


class CircuitlabError(ValueError):
    """A user-facing error that names the problem and the fix."""
