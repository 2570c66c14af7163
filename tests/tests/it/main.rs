//! esk's integration tests: one binary, a module per scenario, all against a real
//! Kafka broker (see `esk_tests::broker`).

mod broker;
mod cluster;
mod compose;
mod console;
mod contexts;
mod coordinator;
mod gateway;
mod guarantees;
mod health;
mod kafka_config;
mod library;
mod platform;
mod polyglot;
mod projector;
mod replica;
mod secured;
mod shop;

mod topics;
mod writer;
