//! Tests of the core without FUSE.
