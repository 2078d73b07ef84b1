"""Errors that name the offending value and the fix."""


class RequestValidationError(ValueError):
    """A request input is invalid. The message names the field, the value and the fix; it is sent to
    that one request as INVALID_ARGUMENT and the server keeps serving."""

    def __init__(self, field: str, value, fix: str):
        self.field, self.value, self.fix = field, value, fix
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"invalid '{field}' = {shown}: {fix}")

    def __reduce__(self):  # pickled across the engine process's pipe with its three parts
        return type(self), (self.field, self.value, self.fix)


class ServerBusyError(RuntimeError):
    """The engine's queue is full; the client should retry later (UNAVAILABLE)."""
