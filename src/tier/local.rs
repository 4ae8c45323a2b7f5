//! The local tier: paths kept on this node only.
//!
//! Its storage *is* the materialized tree under `--state/tree`, so every hook is a yes: the
//! core's own POSIX handling of the tree is the whole implementation. Writes go straight to the
//! tree's file ([`WriteMode::InPlace`]), which is what lets the FUSE adapter hand such files to
//! the kernel for passthrough I/O.

use std::fs::File;
use std::sync::Arc;

use super::{Revision, Target, Tier, TierError, WriteMode};
use crate::fs::Kind;
use crate::op::Op;
use crate::policy::TierKind;

/// Files that never leave this node.
#[derive(Debug, Default)]
pub struct LocalTier;

impl Tier for LocalTier {
    fn kind(&self) -> TierKind {
        TierKind::Local
    }

    fn write_mode(&self) -> WriteMode {
        WriteMode::InPlace
    }

    fn revision(&self, _at: &Target) -> Option<Revision> {
        None
    }

    fn create(&self, _at: &Target, _kind: Kind, _exclusive: bool) -> Op<Option<Revision>, TierError> {
        // Exclusivity on one node is the tree's own O_EXCL.
        Op::ok(None)
    }

    fn commit(
        &self,
        _at: &Target,
        _content: Arc<File>,
        _base: Option<Revision>,
        _durable: bool,
    ) -> Op<Option<Revision>, TierError> {
        // Reached only for local files the core stages for validation (the policy file):
        // installing the shadow into the tree is all there is to do.
        Op::ok(None)
    }

    fn admit(&self, _at: &Target, _rev: Option<&Revision>) -> bool {
        true
    }

    fn remove(&self, _at: &Target, _kind: Kind) -> Op<(), TierError> {
        Op::ok(())
    }

    fn rename(
        &self,
        _from: &Target,
        _to: &Target,
        _kind: Kind,
        _content: Option<Arc<File>>,
        _base: Option<super::Revision>,
    ) -> Op<(), TierError> {
        Op::ok(())
    }

    fn supports_hard_links(&self) -> bool {
        true
    }

    fn symlink(&self, _at: &Target, _target: &std::ffi::OsStr) -> Op<Option<Revision>, TierError> {
        Op::ok(None)
    }

    fn attribute(&self, _at: &Target, _name: &str) -> Option<Vec<u8>> {
        None
    }
}
