# The two commands a newcomer needs; each one sets up everything it uses first.
.PHONY: demo test setup bench

demo:
	@scripts/bootstrap.sh
	.venv/bin/streamd demo

test:
	@scripts/bootstrap.sh --tests
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

bench:
	@scripts/bootstrap.sh
	.venv/bin/python benchmarks/spine.py
