//! Permissions are the kernel's (default_permissions); other users need allow_other.

use crate::harness::{Mount, Options};

/// Runs a shell command as `nobody`.
fn as_nobody(m: &Mount, script: &str) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "bash", "-c", script])
        .current_dir(&m.mnt)
        .output()
        .expect("setpriv")
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn other_users_are_refused_without_allow_other() {
    let m = Mount::start();
    m.sh_ok("echo public > open.txt && chmod 644 open.txt");
    let out = as_nobody(&m, "cat open.txt");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("Permission denied"), "{}", stderr(&out));
}

#[test]
fn allow_other_admits_by_mode_bits() {
    let m = Mount::with(Options {
        allow_other: true,
        ..Default::default()
    });
    m.sh_ok(
        "echo secret > private.txt && chmod 600 private.txt && echo public > open.txt && chmod 644 open.txt \
         && mkdir shared && chmod 1777 shared",
    );
    let out = as_nobody(&m, "cat private.txt");
    assert!(!out.status.success(), "nobody read a 0600 file");
    assert!(stderr(&out).contains("Permission denied"), "{}", stderr(&out));

    let out = as_nobody(&m, "cat open.txt");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "public\n");

    // Writing a file one may not write is refused by the kernel, content unchanged.
    let out = as_nobody(&m, "echo hacked > open.txt");
    assert!(!out.status.success());
    assert_eq!(m.sh_ok("cat open.txt"), "public\n");

    // Files another user creates belong to that user; root's stay root's.
    let out = as_nobody(&m, "echo mine > shared/n.txt && mkdir shared/nd && stat -c '%U %G' shared/n.txt shared/nd");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "nobody nogroup\nnobody nogroup\n");
    assert_eq!(m.sh_ok("stat -c %U open.txt"), "root\n");

    // The sticky directory protects root's file from nobody.
    m.sh_ok("echo r > shared/root.txt && chmod 666 shared/root.txt");
    let out = as_nobody(&m, "rm -f shared/root.txt");
    assert!(!out.status.success());
    assert!(m.path("shared/root.txt").exists());

    // chown to another user is root's right only.
    let out = as_nobody(&m, "chown root shared/n.txt");
    assert!(!out.status.success());
    assert!(stderr(&out).contains("Operation not permitted"), "{}", stderr(&out));
}
