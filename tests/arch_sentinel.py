"""Never imported on purpose: importing it leaves a mark that tests look for.

A model whose task names ``tests.arch_sentinel:build`` must be refused by name,
so after such a model ``sys.modules`` lacks this module and the mark is absent.
"""

from __future__ import annotations

import os

os.environ["FEDMQ_TEST_ARCH_SENTINEL"] = "imported"


def build(**kwargs):  # pragma: no cover (must never run)
    raise AssertionError("code named by a task was imported and run")
