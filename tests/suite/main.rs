//! The integration tests as one test binary: linking one binary instead of eleven (each carrying
//! the whole library) saves about a minute of every `make test`. Each module is one concern.

mod common;

mod cli;
mod contract;
mod encoder_parity;
mod export;
mod features;
mod geometry;
mod inputs;
mod layers;
mod report;
mod resize_parity;
mod resume;
mod temporal;
mod verify;
