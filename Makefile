# The two quick-start commands: `make demo` and `make test`. Each sets up .venv first if needed.
VENV := .venv
STAMP := $(VENV)/.medflare-installed

.PHONY: check-minimum-versions setup demo test test-unit bench bench-heart bench-dpsgd bench-frontier bench-audit bench-he bench-ddp bench-outcome-data clean

$(STAMP): setup.cfg pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/medflare run jobs/brats_fedavg --sites 3

test: $(STAMP)
	$(VENV)/bin/python -m pytest

test-unit: $(STAMP)
	$(VENV)/bin/python -m pytest tests/unit

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/privacy_filters.py
	$(VENV)/bin/python benchmarks/aggregation.py

bench-heart: $(STAMP)
	$(VENV)/bin/python benchmarks/heart_disease.py

bench-dpsgd: $(STAMP)
	$(VENV)/bin/python benchmarks/dp_sgd_step_cost.py

# what medflare audit costs a site per attacked case
bench-audit: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/python benchmarks/audit_cost.py

# one federated round under CKKS encryption (NVFlare's HEBuilder context) against the plain round
bench-he: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/python benchmarks/he_round_cost.py

# local against distributed Gaussian DP (noise shared under CKKS secure aggregation) at the same
# per-site epsilon, on the heart-disease hospitals, the CKKS arithmetic run for real
bench-ddp: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/python benchmarks/distributed_dp.py

# the privacy-utility frontier: BraTS-layout hospitals, then the FLamby heart-disease hospitals
bench-frontier: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/python benchmarks/privacy_utility_frontier.py
	$(VENV)/bin/python benchmarks/heart_disease.py

# peak memory of an outcome site at 5,000 radiographs: images held in memory against streamed
bench-outcome-data: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/python benchmarks/outcome_data_memory.py

# the lowest version every pin allows, in a fresh .venv-minimum, then the unit tests there
check-minimum-versions:
	bash scripts/check_minimum_versions.sh

clean:
	rm -rf workspace .pytest_cache
