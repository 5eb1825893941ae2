class InternLM2GraphError(ValueError):
    """A user-facing problem with the input or options; the message says what to do."""
