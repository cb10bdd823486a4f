"""The one error secure aggregation raises for anything it refuses."""


class SecAggError(ValueError):
    """A refused secure-aggregation step: bad key, share, request, configuration, or too few nodes."""
