//! syncfs: a FUSE filesystem that syncs each path with the consistency its policy asks for.
//!
//! A request from the kernel goes through these layers, each in its own module:
//! - [`fuse`]: the thin adapter from fuser callbacks to core calls;
//! - [`fs`]: the core: inodes, open files, staging of writes, routing by policy;
//! - [`policy`]: the compiled policy table (pure, synchronous);
//! - [`tier`]: one trait and one module per backend;
//! - [`daemon`] and [`cli`]: mounting, the background process, status, the command line.
//!
//! docs/ARCHITECTURE.md walks through where a write goes.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod events;
pub mod fs;
pub mod fuse;
pub mod guard;
pub mod hlc;
pub mod lock;
pub mod logging;
pub mod merge;
pub mod metrics;
pub mod moves;
pub mod nats;
pub mod op;
pub mod policy;
pub mod schema;
pub mod status;
pub mod tier;
pub mod yaml;
