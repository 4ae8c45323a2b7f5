//! End-to-end tests: real syncfs mounts driven with ordinary tools.
//!
//! They need root and /dev/fuse (they mount with mount(2)) and use bash, coreutils, attr
//! (getfattr/setfattr), python3 and setpriv; `scripts/install-deps.sh` installs them.

mod blob;
mod checker;
mod crash;
mod damage;
mod disk;
mod errors;
mod operating;
mod fast;
mod flock;
mod faults;
mod git;
mod gitfaults;
mod harness;
mod history;
mod hostile;
mod lifecycle;
mod merges;
mod locks;
mod model;
mod moves;
mod nats;
mod permissions;
mod posix;
mod proxy;
mod reads;
mod stream;
mod tbd;
mod tools;
