"""Suite definitions; importing this package registers every suite in core.SUITES."""
from . import attention, attention_variants, concat_linear, convert, fusion  # noqa: F401
