//! Causeway: a read-replica-aware PostgreSQL proxy. It classifies every statement with
//! PostgreSQL's own parser, sends writes to the primary and reads to healthy replicas, and
//! pools backend connections per (user, database).

pub mod admin;
pub mod auth;
pub mod cancel;
pub mod catalog;
pub mod classify;
pub mod clients;
pub mod cluster;
pub mod config;
pub mod consistency;
pub mod demo;
pub mod error;
pub mod launcher;
pub mod pool;
pub mod priority;
pub mod protocol;
pub mod reload;
pub mod route;
pub mod server;
pub mod session;
pub mod stats;
pub mod tls;
pub mod transport;
