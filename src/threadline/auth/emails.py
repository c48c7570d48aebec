"""What an email address must look like: one rule for the auth service and the API schema.

No whitespace and no control character anywhere (spelled out: Python's `\\s` and the
JavaScript `\\s` of JSON Schema differ on a few control characters).
"""

from __future__ import annotations

import re

_EMAIL_CHAR = r"[^@\s\x00-\x1f\x7f-\x9f]"
EMAIL = re.compile(rf"^{_EMAIL_CHAR}{{1,64}}@{_EMAIL_CHAR}+\.{_EMAIL_CHAR}+$")
"""A normalized address (stripped, lower case)."""
EMAIL_PATTERN = rf"^\s*{_EMAIL_CHAR}{{1,64}}@{_EMAIL_CHAR}+\.{_EMAIL_CHAR}+\s*$"
"""What registration accepts before normalizing: the same, with whitespace around it."""
