//! Ordinary tools on a mounted local tier behave as on a local directory.

use crate::harness::{peak_rss_kib, sh_ok_in, Mount, Options};

#[test]
fn shell_redirections_cat_and_append() {
    let m = Mount::local();
    let out = m.sh_ok(
        r#"
        echo hello > a.txt
        cat a.txt
        echo world >> a.txt
        cat a.txt
        : > a.txt
        stat -c %s a.txt
        printf 'x%.0s' {1..10000} > big
        wc -c < big
        "#,
    );
    assert_eq!(out, "hello\nhello\nworld\n0\n10000\n");
}

#[test]
fn cp_archive_of_a_tree_round_trips() {
    let m = Mount::local();
    let src = m.base.path().join("src");
    sh_ok_in(
        m.base.path(),
        r#"
        mkdir -p src/a/b src/empty
        echo one > src/a/one.txt
        printf 'two\0bin' > src/a/b/two.bin
        ln -s ../one.txt src/a/b/link
        ln src/a/one.txt src/a/hard
        chmod 0640 src/a/one.txt
        chmod 0750 src/a/b
        setfattr -n user.note -v kept src/a/one.txt
        TZ=UTC touch -d '2001-02-03 04:05:06' src/a/b/two.bin
        dd if=/dev/urandom of=src/random bs=64k count=40 status=none
        "#,
    );
    m.sh_ok(&format!("cp -a {} copy", src.display()));
    let listing = |root: &str| {
        sh_ok_in(
            m.base.path(),
            &format!("cd {root} && find . -printf '%p %y %m %s %l\\n' | sort"),
        )
    };
    assert_eq!(listing(&src.display().to_string()), listing(&m.path("copy").display().to_string()));
    m.sh_ok(&format!("diff -r {} copy", src.display()));
    let out = m.sh_ok(
        "getfattr -n user.note --only-values copy/a/one.txt; echo; \
         stat -c '%h %Y' copy/a/one.txt copy/a/b/two.bin; readlink copy/a/b/link",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "kept", "{out}");
    assert!(lines[1].starts_with("2 "), "hard link count kept: {out}");
    assert_eq!(lines[2], "1 981173106", "mtime kept: {out}");
    assert_eq!(lines[3], "../one.txt", "{out}");
}

#[test]
fn mv_rm_ln_chmod_find() {
    let m = Mount::local();
    let out = m.sh_ok(
        r#"
        mkdir work && cd work
        mkdir -p d1/d2
        echo x > d1/d2/f
        mv d1 moved
        cat moved/d2/f
        echo y > other
        mv -f other moved/d2/f
        cat moved/d2/f
        ln -s d2/f moved/sym
        cat moved/sym
        ln moved/d2/f hard
        stat -c %h hard
        rm moved/d2/f
        cat hard
        stat -c %h hard
        chmod 600 hard
        stat -c %a hard
        chmod u+x,g+s hard
        stat -c %A hard
        find . | sort
        rm -r moved
        ls
        "#,
    );
    assert_eq!(
        out,
        "x\ny\ny\n2\ny\n1\n600\n-rwx--S---\n.\n./hard\n./moved\n./moved/d2\n./moved/sym\nhard\n"
    );
}

#[test]
fn xattrs_with_getfattr_and_setfattr() {
    let m = Mount::local();
    let out = m.sh_ok(
        r#"
        echo data > f
        mkdir d
        setfattr -n user.a -v 1 f
        setfattr -n user.b -v two d
        getfattr -n user.a --only-values f; echo
        getfattr -n user.b --only-values d; echo
        getfattr -n user.syncfs.tier --only-values f; echo
        getfattr -n user.syncfs.policy --only-values f; echo
        getfattr -d f
        setfattr -x user.a f
        getfattr -d f | wc -l
        "#,
    );
    assert_eq!(out, "1\ntwo\nlocal\n**\n# file: f\nuser.a=\"1\"\n\n0\n");
}

#[test]
fn dd_large_file_streams_through_bounded_memory() {
    // Without passthrough every byte crosses the daemon, which must not hold the file.
    let m = Mount::with(Options {
        config: Some("fuse:\n  passthrough: false\n".into()),
        ..Options::local()
    });
    assert_eq!(m.status()["fuse"]["passthrough"], false);
    let before = peak_rss_kib(m.pid());
    let out = m.sh_ok(
        r#"
        dd if=/dev/urandom of=../src.bin bs=1M count=256 status=none
        dd if=../src.bin of=big.bin bs=1M conv=fsync status=none
        sha256sum < ../src.bin
        sha256sum < big.bin
        stat -c %s big.bin
        "#,
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], lines[1], "content differs");
    assert_eq!(lines[2], (256u64 << 20).to_string());
    let after = peak_rss_kib(m.pid());
    assert!(m.status()["fuse"]["write_requests"].as_u64().unwrap() >= 256, "writes went through the daemon");
    assert!(
        after < before + 64 * 1024,
        "daemon peak RSS grew from {before} KiB to {after} KiB for a 256 MiB file"
    );
}

#[test]
fn passthrough_mount_serves_large_files() {
    let m = Mount::local();
    assert_eq!(m.status()["fuse"]["passthrough"], true, "this kernel offers FUSE passthrough");
    let out = m.sh_ok(
        r#"
        dd if=/dev/urandom of=../src.bin bs=1M count=64 status=none
        cp ../src.bin big.bin
        cmp ../src.bin big.bin && echo same
        truncate -s 1000 big.bin
        stat -c %s big.bin
        "#,
    );
    assert_eq!(out, "same\n1000\n");
    // The kernel did the I/O on the backing file: no read or write reached the daemon.
    m.sh_ok("echo 3 > /proc/sys/vm/drop_caches; cat big.bin > /dev/null; echo more >> big.bin");
    let fuse = &m.status()["fuse"];
    assert_eq!((fuse["read_requests"].as_u64(), fuse["write_requests"].as_u64()), (Some(0), Some(0)), "{fuse}");
}

#[test]
fn unlinked_open_files_and_fifos() {
    let m = Mount::local();
    let out = m.sh_ok(
        r#"
        mkdir work && cd work
        echo keep > f
        exec 3<>f
        rm f
        echo more >&3
        cat <&3 || true
        stat -L -c %s /proc/self/fd/3
        exec 3>&-
        ls
        mkfifo pipe
        (echo through > pipe &)
        cat pipe
        stat -c %F pipe
        "#,
    );
    // "more\n" overwrote "keep\n" at offset 0 of the unlinked file; `ls` shows nothing.
    assert_eq!(out, "5\nthrough\nfifo\n");
}

#[test]
fn utimens_truncate_and_df() {
    let m = Mount::local();
    let out = m.sh_ok(
        r#"
        touch -d '2020-01-02 03:04:05 UTC' t
        stat -c %Y t
        touch -a -d '2021-01-01 00:00:00 UTC' t
        stat -c '%X %Y' t
        truncate -s 5M t
        stat -c %s t
        df -P . | tail -1 | awk '{print ($2 > 0)}'
        "#,
    );
    assert_eq!(out, "1577934245\n1609459200 1577934245\n5242880\n1\n");
}

#[test]
fn many_files_in_one_directory_list_completely() {
    let m = Mount::local();
    let out = m.sh_ok(
        r#"
        mkdir many
        for i in $(seq 1 2000); do echo $i > many/file-$i; done
        ls many | wc -l
        ls -l many | tail -n +2 | wc -l
        cat many/file-1999
        rm -r many
        "#,
    );
    assert_eq!(out, "2000\n2000\n1999\n");
}
