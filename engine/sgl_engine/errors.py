"""Errors the engine reports to a single request without affecting anyone else."""

from __future__ import annotations

CLIENT_ABORT = "aborted by client"  # the finish message of a request ended by `Engine.abort`


class InvalidRequestError(ValueError):
    """A request the engine refuses.

    `field` names the offending field (e.g. 'sampling_params.top_p', 'input_ids', 'prompt'),
    or is None when the request as a whole is at fault.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __reduce__(self):
        return (type(self), (self.message, self.field))


class EngineUnavailableError(RuntimeError):
    """The engine can run no forward pass any more (a tensor-parallel rank died, say); its
    message is meant for the clients whose requests it fails."""
