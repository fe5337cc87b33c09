"""The product tests' fixtures for the research scripts' tests (opt-in: `python -m pytest -q research/tests`,
not collected by `make test`).

pytest only loads conftest files on the way from the rootdir to a test, so tests/conftest.py is
imported here (as `tests.conftest`: pytest's pythonpath holds the repository root) and its fixtures
re-exported; `from conftest import tiny_config` in these tests reads this module.
"""

from tests.conftest import (  # noqa: F401  (fixtures and helpers, re-exported)
    EXAMPLES,
    REPO,
    default_chat,
    default_model,
    tiny_chat,
    tiny_config,
    tiny_lm_dir,
    tiny_model,
)
