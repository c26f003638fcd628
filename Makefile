# The two commands of the README. Both install what they need first (as root on Debian).
.PHONY: setup demo test lint example bench

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/fedmq demo

test: lint
	@FEDMQ_TEST_SETUP=1 bash scripts/setup.sh
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check broker device_agent aggregator fedmq tests scripts examples
	.venv/bin/ruff format --check broker device_agent aggregator fedmq tests scripts examples

example: setup
	.venv/bin/python examples/bob_and_alice/run.py
