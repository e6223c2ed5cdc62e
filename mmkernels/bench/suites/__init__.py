"""Suite definitions; importing this package registers every suite in core.SUITES."""
from . import attention, concat_linear, convert, fusion, latency  # noqa: F401
