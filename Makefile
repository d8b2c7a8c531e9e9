# The two commands of the README: `make run` and `make test`. Both set up .venv first (once).
.PHONY: run test test-fast setup setup-test bench clean

run: setup
	.venv/bin/hearth

test: setup-test
	.venv/bin/python -m pytest -p no:cacheprovider $(PYTEST_ARGS)

# Everything but the tests marked slow: for a quick loop while developing.
test-fast: setup-test
	.venv/bin/python -m pytest -p no:cacheprovider -m "not slow" $(PYTEST_ARGS)

setup:
	@packaging/setup.sh run

setup-test:
	@packaging/setup.sh test

clean:
	rm -rf .venv build *.egg-info
