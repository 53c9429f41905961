"""web."""

import config  # noqa: F401  (first: see config/__init__.py)
