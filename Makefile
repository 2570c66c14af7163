# esk: event sourcing on Apache Kafka. Thin targets: the work is in cargo and infra/.
CARGO ?= cargo

.PHONY: up down status build test bench bench-peers lint fmt images

## up: start Kafka (unless KAFKA_BOOTSTRAP_SERVERS names one), create the topics, start the services
up:
	@infra/platform.sh up

## down: stop what `make up` started
down:
	@infra/platform.sh down

## status: what runs, where
status:
	@infra/platform.sh status

build:
	$(CARGO) build --locked --workspace --bins

## images: esk/kafka and esk/esk (release binaries), built here with no registry, for infra/docker-compose.yml
images:
	@infra/docker/build.sh all

## test: every test, unit and integration, against a real broker (started here if needed)
test: build
	ESK_TEST_NO_BUILD=1 $(CARGO) test --locked --workspace

## bench: the benchmarks, with Kafka's own tools on the same broker for reference
bench:
	@infra/bench.sh

## bench-peers: PostgreSQL and UmaDB (installed here if missing) under esk-bench's appends, beside esk's figures
bench-peers:
	@infra/bench-peers.sh

## lint: formatting and clippy, warnings are errors; Kafka clients built only in crates/kafka
lint:
	$(CARGO) fmt --all --check
	infra/lint/kafka-clients.sh --self-test
	infra/lint/kafka-clients.sh
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all
