use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::file::{BEFORE_RENAME, OpenError, WriteError, open_regular};
use crate::keyring::KeyState;

const KEK_B64: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";

/// A keyring text with a correct checksum over `body`.
fn with_checksum(body: &str) -> String {
    let digest = Sha256::digest(body.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{body}sha256 {hex}\n")
}

fn body(versions: &str) -> String {
    format!("kekd-keyring v1\nkeyring 5c0e9a1f2b3d4c6e8f7a9b0c1d2e3f40\n{versions}")
}

fn parse_err(text: &str) -> String {
    let err = KeyringFile::parse(text.as_bytes()).unwrap_err().to_string();
    assert!(!err.contains(KEK_B64), "error leaks key material: {err}");
    assert!(!err.contains("AQEB"), "error leaks key material: {err}");
    err
}

#[test]
fn encode_parse_round_trip() {
    let file = KeyringFile::generate(Timestamp::from_unix(1_764_321_574)).unwrap();
    let text = file.encode();
    let back = KeyringFile::parse(text.as_bytes()).unwrap();
    assert_eq!(back.id, file.id);
    assert_eq!(back.infos(), file.infos());
    assert_eq!(
        back.versions[0].kek.as_ref().unwrap().expose_secret(),
        file.versions[0].kek.as_ref().unwrap().expose_secret()
    );
    assert_eq!(*back.encode(), *text);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "kekd-keyring v1");
    assert!(lines[2].starts_with(
        "version 1 primary created=2025-11-28T09:19:34Z promoted=2025-11-28T09:19:34Z kek="
    ));
    assert!(lines[3].starts_with("sha256 "));
}

#[test]
fn all_states_parse() {
    let text = with_checksum(&body(&format!(
        "version 1 destroyed created=2025-01-01T00:00:00Z retired=2025-02-01T00:00:00Z destroyed=2025-03-01T00:00:00Z\n\
         version 2 retired created=2025-01-02T00:00:00Z retired=2025-02-01T00:00:00Z kek={KEK_B64}\n\
         version 3 decrypt-only created=2025-01-03T00:00:00Z kek={KEK_B64}\n\
         version 4 primary created=2025-01-04T00:00:00Z kek={KEK_B64}\n\
         version 7 pending created=2025-01-05T00:00:00Z kek={KEK_B64}\n"
    )));
    let file = KeyringFile::parse(text.as_bytes()).unwrap();
    let states: Vec<KeyState> = file.versions.iter().map(|v| v.info.state).collect();
    assert_eq!(
        states,
        [
            KeyState::Destroyed,
            KeyState::Retired,
            KeyState::DecryptOnly,
            KeyState::Primary,
            KeyState::Pending
        ]
    );
    assert!(file.versions[0].kek.is_none());
}

#[test]
fn errors_name_line_and_field_never_content() {
    let v = |rest: &str| with_checksum(&body(&format!("version 1 primary {rest}\n")));
    let created = "created=2025-01-01T00:00:00Z";
    let cases: Vec<(String, &str)> = vec![
        (
            v(&format!("{created} kek=AQEB")),
            "line 3: field `kek` must be the base64 encoding of 32 bytes",
        ),
        (
            v(&format!("{created} kek={KEK_B64}AQEB")),
            "line 3: field `kek` must be the base64 encoding of 32 bytes",
        ),
        (v(created), "line 3: field `kek` is missing"),
        (
            v(&format!("kek={KEK_B64}")),
            "line 3: field `created` is missing",
        ),
        (
            v(&format!("created=yesterday kek={KEK_B64}")),
            "line 3: field `created` must be a UTC time like 2026-01-31T23:59:59Z",
        ),
        (
            v(&format!("{created} {created} kek={KEK_B64}")),
            "line 3: field `created` appears twice",
        ),
        (
            v(&format!("{created} kek={KEK_B64} kek={KEK_B64}")),
            "line 3: field `kek` appears twice",
        ),
        (
            v(&format!("{created} secretAQEBAQEB")),
            "line 3 has a field that is not `name=value`",
        ),
        (
            v(&format!("{created} {KEK_B64}=x kek={KEK_B64}")),
            "line 3 has an unknown field name",
        ),
        (
            with_checksum(&body(&format!(
                "version 1 destroyed {created} kek={KEK_B64}\n"
            ))),
            "line 3: field `kek` must not be present on a destroyed version",
        ),
        (
            with_checksum(&body(&format!(
                "version 01 primary {created} kek={KEK_B64}\n"
            ))),
            "line 3: field `version` must be a whole number from 1 to 4294967295",
        ),
        (
            with_checksum(&body(&format!(
                "version 1 active {created} kek={KEK_B64}\n"
            ))),
            "line 3: field `state` must be pending, primary, decrypt-only, retired or destroyed",
        ),
        (
            with_checksum(&body(&format!("key 1 primary {created} kek={KEK_B64}\n"))),
            "line 3 must start with `version`",
        ),
        (
            with_checksum(&body(&format!(
                "version 2 primary {created} kek={KEK_B64}\nversion 2 pending {created} kek={KEK_B64}\n"
            ))),
            "version 2 appears after version 2; versions must be listed once each, in increasing order",
        ),
        (
            with_checksum(&body(&format!(
                "version 1 pending {created} kek={KEK_B64}\n"
            ))),
            "no version is primary; exactly one must be (kekd admin promote)",
        ),
        (
            with_checksum("kekd-keyring v2\nkeyring x\n"),
            "line 1 is a keyring format this kekd does not read (expected `kekd-keyring v1`)",
        ),
        (
            with_checksum("hello\n"),
            "line 1 is not `kekd-keyring v1`: not a kekd keyring",
        ),
        (
            with_checksum("kekd-keyring v1\nkeyring 5C0E\n"),
            "line 2: field `keyring` must be 32 lowercase hex digits",
        ),
        (
            with_checksum("kekd-keyring v1\n"),
            "line 2 is missing: expected `keyring <id>`",
        ),
        (
            with_checksum(&body(&format!(
                "version 1 primary {created} kek={KEK_B64}\r\n"
            ))),
            "line 3 has a carriage return: the file was converted to CRLF line endings",
        ),
        (
            with_checksum("kekd-keyring v1\r\nkeyring 5c0e9a1f2b3d4c6e8f7a9b0c1d2e3f40\n"),
            "line 1 has a carriage return: the file was converted to CRLF line endings",
        ),
        (
            with_checksum(""),
            "line 1 is not `kekd-keyring v1`: not a kekd keyring",
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(parse_err(&text), expected, "for {text:?}");
    }
}

#[test]
fn truncation_and_edits_fail_the_checksum() {
    let file = KeyringFile::generate(Timestamp::from_unix(0)).unwrap();
    let text = file.encode();
    // Every proper prefix fails: a truncated copy never loads as a smaller keyring.
    for cut in 0..text.len() {
        assert!(
            KeyringFile::parse(&text.as_bytes()[..cut]).is_err(),
            "prefix of {cut} bytes parsed"
        );
    }
    let edited = text.replacen("primary", "pending", 1);
    assert_eq!(
        parse_err(&edited),
        "line 4: field `sha256` checksum does not match the file's content (edited by hand or damaged in a copy)"
    );
    let no_newline = &text[..text.len() - 1];
    assert_eq!(
        parse_err(no_newline),
        "line 4 does not end in a newline (truncated?)"
    );
    assert_eq!(
        parse_err(&text[..text.len() - 72]),
        "line 3 must be the `sha256 <digest>` line that ends every keyring (file truncated?)"
    );
    assert_eq!(
        parse_err("\u{0}\u{ff}"),
        "line 1 is not `kekd-keyring v1`: not a kekd keyring"
    );
    assert_eq!(
        parse_err("kekd-keyring v1"),
        "line 1 does not end in a newline (truncated?)"
    );
    assert_eq!(
        KeyringFile::parse(b"kekd-keyring v1\n\xff\n")
            .unwrap_err()
            .to_string(),
        "line 2 is not UTF-8 text"
    );
}

#[test]
fn create_is_durable_private_and_never_clobbers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring");
    let first = KeyringFile::generate(Timestamp::from_unix(1)).unwrap();
    create(&path, &first).unwrap();
    let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let before = fs::read(&path).unwrap();

    let second = KeyringFile::generate(Timestamp::from_unix(2)).unwrap();
    let err = create(&path, &second).unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists { .. }));
    assert_eq!(
        err.to_string(),
        format!(
            "keyring {} already exists; refusing to overwrite it (every Secret it encrypted would be lost)",
            path.display()
        )
    );
    assert_eq!(fs::read(&path).unwrap(), before);
    // No temp files are left behind.
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    assert_eq!(read(&path).unwrap().id, first.id);
}

#[test]
fn replace_swaps_whole_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring");
    let first = KeyringFile::generate(Timestamp::from_unix(1)).unwrap();
    create(&path, &first).unwrap();
    let second = KeyringFile::generate(Timestamp::from_unix(2)).unwrap();
    replace(&path, &second).unwrap();
    assert_eq!(read(&path).unwrap().id, second.id);
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn failed_write_leaves_the_old_file_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring");
    create(
        &path,
        &KeyringFile::generate(Timestamp::from_unix(1)).unwrap(),
    )
    .unwrap();
    let before = fs::read(&path).unwrap();
    // A read-only directory makes the temp file impossible to create (as a
    // non-root user; root ignores the bits, so only assert when it failed).
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o500)).unwrap();
    let result = replace(
        &path,
        &KeyringFile::generate(Timestamp::from_unix(2)).unwrap(),
    );
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
    if let Err(e) = result {
        assert!(
            e.to_string()
                .contains("cannot create a temporary file beside it"),
            "{e}"
        );
        assert_eq!(fs::read(&path).unwrap(), before);
    }
    // A target that is a directory makes the rename fail after the temp file was written.
    let blocked = dir.path().join("blocked");
    fs::create_dir(&blocked).unwrap();
    fs::write(blocked.join("x"), b"x").unwrap();
    let err = replace(
        &blocked,
        &KeyringFile::generate(Timestamp::from_unix(3)).unwrap(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot rename the temporary file into place"),
        "{err}"
    );
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "temp file left behind: {names:?}");
}

#[test]
fn read_refuses_loose_permissions_and_non_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring");
    create(
        &path,
        &KeyringFile::generate(Timestamp::from_unix(1)).unwrap(),
    )
    .unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
    let err = read(&path).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "keyring {0} has permissions 0640, which let other users read the keys; run `chmod 600 {0}`",
            path.display()
        )
    );
    fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).unwrap();
    read(&path).unwrap();

    let missing = dir.path().join("nope");
    assert_eq!(
        read(&missing).unwrap_err().to_string(),
        format!(
            "keyring {0} does not exist (create one with `kekd admin init --keyring {0}`)",
            missing.display()
        )
    );
    assert!(matches!(
        read(dir.path()).unwrap_err(),
        StoreError::NotAFile { .. }
    ));

    let big = dir.path().join("big");
    fs::write(&big, vec![b'a'; MAX_FILE_LEN as usize + 1]).unwrap();
    fs::set_permissions(&big, fs::Permissions::from_mode(0o600)).unwrap();
    assert!(matches!(
        read(&big).unwrap_err(),
        StoreError::TooLarge { .. }
    ));
}

#[test]
fn read_follows_symlinks_to_private_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keyring");
    let file = KeyringFile::generate(Timestamp::from_unix(1)).unwrap();
    create(&path, &file).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    assert_eq!(read(&link).unwrap().id, file.id);
}

/// Whoever owns the directory of a keyring symlink can repoint it between
/// an admin command's read and its write (an inotify watch on the keyring
/// times it): root would then rename the new keyring over whatever the link
/// leads to, `/etc/passwd` included. `replace` writes only over a copy of
/// the same keyring, and names where the link leads.
#[test]
fn replace_through_a_repointed_link_writes_only_over_the_same_keyring() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    let link = dir.path().join("keyring");
    let mut file = KeyringFile::generate(Timestamp::from_unix(1)).unwrap();
    create(&real, &file).unwrap();
    std::os::unix::fs::symlink(&real, &link).unwrap();
    file.rotate(Timestamp::from_unix(2), false, None).unwrap();

    // The link now leads to a file that is no keyring, or to another one.
    let victim = dir.path().join("passwd");
    fs::write(&victim, "root:x:0:0::/root:/bin/sh\n").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
    let other = dir.path().join("other");
    create(
        &other,
        &KeyringFile::generate(Timestamp::from_unix(3)).unwrap(),
    )
    .unwrap();
    let other_id = read(&other).unwrap().id;
    for (target, why) in [
        (
            &victim,
            format!(
                "keyring {}: line 1 is not `kekd-keyring v1`: not a kekd keyring",
                victim.display()
            ),
        ),
        (&other, format!("it holds keyring {other_id}")),
    ] {
        let before = fs::read(target).unwrap();
        fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(target, &link).unwrap();
        let err = replace(&link, &file).unwrap_err();
        assert!(
            matches!(err, StoreError::Write(WriteError::Moved { .. })),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "keyring {} now leads to {}, which is not the keyring read under the lock ({why}); nothing was \
                 written: check who can change {} and the directories on its way",
                link.display(),
                target.display(),
                link.display()
            )
        );
        assert_eq!(fs::read(target).unwrap(), before);
    }

    // Back at the keyring, the change goes through.
    fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&real, &link).unwrap();
    replace(&link, &file).unwrap();
    assert_eq!(read(&real).unwrap().versions.len(), 2);
}

/// `open_regular` opens only a regular file, never blocks on a FIFO, and
/// follows a final link only when told to; the opened file reads normally
/// (`O_NONBLOCK` cleared).
#[test]
fn open_regular_refuses_everything_but_a_regular_file_without_blocking() {
    use std::io::Read as _;
    let dir = tempfile::tempdir().unwrap();
    let at = |name: &str| dir.path().join(name);
    let what = |path: &Path, links: Links| match open_regular(path, links) {
        Ok(_) => "a regular file".to_owned(),
        Err(OpenError::NotRegular { what, .. }) => what.to_owned(),
        Err(OpenError::Symlink { .. }) => "refused link".to_owned(),
        Err(OpenError::NotFound { .. }) => "nothing".to_owned(),
        Err(e @ OpenError::Io { .. }) => e.to_string(),
    };
    fs::write(at("file"), b"text").unwrap();
    let (mut f, meta) = open_regular(&at("file"), Links::Refuse).unwrap();
    assert_eq!(meta.len(), 4);
    let flags = rustix::fs::fcntl_getfl(&f).unwrap();
    assert!(!flags.contains(rustix::fs::OFlags::NONBLOCK), "{flags:?}");
    let mut text = String::new();
    f.read_to_string(&mut text).unwrap();
    assert_eq!(text, "text");

    rustix::fs::mknodat(
        rustix::fs::CWD,
        at("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    fs::create_dir(at("dir")).unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(at("socket")).unwrap();
    std::os::unix::fs::symlink("/dev/null", at("null")).unwrap();
    std::os::unix::fs::symlink(at("file"), at("link")).unwrap();
    std::os::unix::fs::symlink(at("fifo"), at("fifo-link")).unwrap();
    for (name, links, expected) in [
        ("fifo", Links::Refuse, "a FIFO"),
        ("fifo", Links::Follow, "a FIFO"),
        ("fifo-link", Links::Follow, "a FIFO"),
        ("fifo-link", Links::Refuse, "refused link"),
        ("dir", Links::Follow, "a directory"),
        ("socket", Links::Follow, "a socket"),
        ("null", Links::Follow, "a character device"),
        ("null", Links::Refuse, "refused link"),
        ("link", Links::Follow, "a regular file"),
        ("link", Links::Refuse, "refused link"),
        ("missing", Links::Follow, "nothing"),
    ] {
        assert_eq!(what(&at(name), links), expected, "{name} {links:?}");
    }
    assert_eq!(
        open_regular(&at("fifo"), Links::Refuse)
            .unwrap_err()
            .to_string(),
        format!(
            "{} is a FIFO, not a regular file; nothing was read from it: put the file itself there (a pipe's \
             output must be saved to a file first)",
            at("fifo").display()
        )
    );
}

/// Runs `hook` in this thread's next durable write, between the temp file's
/// fsync and the rename: where a racing attacker acts.
fn before_rename(hook: impl FnOnce() + 'static) {
    BEFORE_RENAME.with(|h| *h.borrow_mut() = Some(Box::new(hook)));
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Whoever owns a directory on a symlinked keyring's resolved path swaps it
/// for a link (to a directory of root's, where a file of the same name
/// waits) after `replace` checked the target: the write still lands in the
/// directory that was checked, never through the new link.
#[test]
fn replace_through_a_link_writes_in_the_directory_it_checked_even_if_its_path_is_swapped() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    fs::create_dir(&real).unwrap();
    let target = real.join("keyring");
    let link = dir.path().join("keyring");
    let mut file = KeyringFile::generate(Timestamp::from_unix(1)).unwrap();
    create(&target, &file).unwrap();
    std::os::unix::fs::symlink(&target, &link).unwrap();
    // Root's directory, holding a file of the keyring's name: a copy of the
    // same keyring, so not even a re-read by path would tell them apart.
    let roots = dir.path().join("roots");
    fs::create_dir(&roots).unwrap();
    fs::copy(&target, roots.join("keyring")).unwrap();
    let victim = fs::read(roots.join("keyring")).unwrap();
    file.rotate(Timestamp::from_unix(2), false, None).unwrap();

    let moved = dir.path().join("moved");
    let (r, m, o) = (real.clone(), moved.clone(), roots.clone());
    before_rename(move || {
        fs::rename(&r, &m).unwrap();
        std::os::unix::fs::symlink(&o, &r).unwrap();
    });
    replace(&link, &file).unwrap();
    assert_eq!(fs::read(roots.join("keyring")).unwrap(), victim);
    assert_eq!(names(&roots), ["keyring"]);
    assert_eq!(read(&moved.join("keyring")).unwrap().versions.len(), 2);
    assert_eq!(names(&moved), ["keyring"]);
}

/// Another file put in the keyring's place (through a link, or named
/// directly) while the change is written: nothing is renamed over it, the
/// error says so, and no temp file is left.
#[test]
fn replace_refuses_when_another_file_took_the_keyrings_place_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    fs::create_dir(&real).unwrap();
    let target = real.join("keyring");
    let link = dir.path().join("keyring");
    let mut file = KeyringFile::generate(Timestamp::from_unix(1)).unwrap();
    create(&target, &file).unwrap();
    std::os::unix::fs::symlink(&target, &link).unwrap();
    file.rotate(Timestamp::from_unix(2), false, None).unwrap();
    let planted = b"root:x:0:0::/root:/bin/sh\n";
    for (named, why_path) in [(&link, &target), (&target, &target)] {
        let swap = target.clone();
        let aside = dir.path().join("aside");
        before_rename(move || {
            fs::write(&aside, planted).unwrap();
            fs::rename(&aside, &swap).unwrap();
        });
        let err = replace(named, &file).unwrap_err();
        assert!(
            matches!(err, StoreError::Write(WriteError::Moved { .. })),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "keyring {n} now leads to {t}, which is not the keyring read under the lock (another file was put \
                 in its place while the change was written); nothing was written: check who can change {n} and \
                 the directories on its way",
                n = named.display(),
                t = why_path.display()
            )
        );
        assert_eq!(fs::read(&target).unwrap(), planted);
        assert_eq!(names(&real), ["keyring"]);
        // Put a keyring back for the next round.
        fs::remove_file(&target).unwrap();
        create(
            &target,
            &KeyringFile::parse(file.encode().as_bytes()).unwrap(),
        )
        .unwrap();
        file.rotate(Timestamp::from_unix(3), false, None).unwrap();
    }
}

/// A directory on the resolved path that is already a link when `replace`
/// opens it (swapped between the resolution and the open) is refused: the
/// directory is opened one component at a time without following links.
#[test]
fn open_dir_refuses_a_link_anywhere_on_a_resolved_path() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    fs::create_dir_all(real.join("sub")).unwrap();
    let swapped = dir.path().join("swapped");
    std::os::unix::fs::symlink(&real, &swapped).unwrap();
    assert!(open_dir(&real.join("sub"), Links::Refuse).is_ok());
    for path in [swapped.join("sub"), swapped.clone()] {
        let err = open_dir(&path, Links::Refuse).unwrap_err();
        assert!(
            [rustix::io::Errno::LOOP, rustix::io::Errno::NOTDIR]
                .iter()
                .any(|e| Some(e.raw_os_error()) == err.raw_os_error()),
            "{path:?}: {err:?}"
        );
        assert!(open_dir(&path, Links::Follow).is_ok());
    }
}
