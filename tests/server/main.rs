//! Integration tests: the real server, in-process on loopback port 0, driven by real clients.
//! One test binary (faster to build and link than one per file).

mod bad_input;
mod cli;
mod common;
mod deploy;
mod faults;
mod ghz;
mod kserve;
mod lifecycle;
mod load;
mod metrics;
mod overload;
mod own_api;
mod prometheus;
mod repository;
mod rest;
mod tls;
mod triton;
