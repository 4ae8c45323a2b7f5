//! Paths as NATS KV keys, and back.
//!
//! A key is the path's components joined by `.`. Inside a component, bytes in
//! `[A-Za-z0-9_-]` stay as they are; every other byte (`.`, spaces, `*`, `>`, `=`, non-ASCII
//! UTF-8 bytes, ...) becomes `=HH` (two upper-case hex digits). `=` is a valid key character
//! that a component never holds literally, so the encoding is reversible and no file name can
//! produce a `.` (a separator) or a wildcard: a name cannot address another key. An empty
//! directory is kept alive by a marker key, its encoded path followed by `.=`, which no file
//! can produce because `=` alone is not a complete escape.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

/// The longest key syncfs writes. NATS subjects travel in protocol lines that servers cap at
/// 4096 bytes by default (`max_control_line`); this leaves room for the `$KV.<bucket>.` prefix
/// and the reply subject.
pub const MAX_KEY_LEN: usize = 1024;

/// The last component of a directory marker key.
const DIR_MARKER: &str = "=";

fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

fn encode_component(name: &OsStr, out: &mut String) {
    for &b in name.as_bytes() {
        if is_plain(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
}

/// Why a path cannot be a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// The encoded key would be longer than [`MAX_KEY_LEN`].
    TooLong,
    /// The path is empty or not a plain relative path.
    NotAPath,
}

/// The key of a file at `path` (relative to the sync root).
pub fn encode(path: &Path) -> Result<String, KeyError> {
    let mut out = String::new();
    for (i, c) in path.components().enumerate() {
        let Component::Normal(name) = c else {
            return Err(KeyError::NotAPath);
        };
        if i > 0 {
            out.push('.');
        }
        encode_component(name, &mut out);
    }
    if out.is_empty() {
        return Err(KeyError::NotAPath);
    }
    if out.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong);
    }
    Ok(out)
}

/// The marker key that keeps the directory at `path` alive while it is empty.
pub fn encode_dir(path: &Path) -> Result<String, KeyError> {
    let key = format!("{}.{DIR_MARKER}", encode(path)?);
    if key.len() > MAX_KEY_LEN {
        return Err(KeyError::TooLong);
    }
    Ok(key)
}

/// What a key names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A file at this path.
    File(PathBuf),
    /// The marker of an empty directory at this path.
    Dir(PathBuf),
}

fn decode_component(text: &str) -> Option<OsString> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if is_plain(b) {
            out.push(b);
            i += 1;
        } else if b == b'=' && i + 3 <= bytes.len() {
            let hex = text.get(i + 1..i + 3)?;
            if !hex.bytes().all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(&h)) {
                return None;
            }
            let escaped = u8::from_str_radix(hex, 16).ok()?;
            if is_plain(escaped) {
                // Not how syncfs spells it (`=41` for `A`): a second key for one path.
                return None;
            }
            out.push(escaped);
            i += 3;
        } else {
            return None;
        }
    }
    if out.is_empty() || out == b"." || out == b".." || out.contains(&b'/') || out.contains(&0) {
        return None;
    }
    Some(OsString::from_vec(out))
}

/// The path a key names, or `None` for keys syncfs did not write (other clients may share
/// the bucket; such keys are ignored, never guessed at).
pub fn decode(key: &str) -> Option<Decoded> {
    let mut parts: Vec<&str> = key.split('.').collect();
    let dir = parts.last() == Some(&DIR_MARKER);
    if dir {
        parts.pop();
    }
    if parts.is_empty() {
        return None;
    }
    let mut path = PathBuf::new();
    for part in parts {
        path.push(decode_component(part)?);
    }
    Some(if dir { Decoded::Dir(path) } else { Decoded::File(path) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn odd_names_round_trip_and_cannot_address_other_keys() {
        let cases: &[(&str, &str)] = &[
            ("fast/claims/x", "fast.claims.x"),
            ("fast/claims/a b", "fast.claims.a=20b"),
            ("fast/claims/v1.2", "fast.claims.v1=2E2"),
            ("fast/claims/*", "fast.claims.=2A"),
            ("fast/claims/>", "fast.claims.=3E"),
            ("fast/claims/a=b", "fast.claims.a=3Db"),
            ("fast/é", "fast.=C3=A9"),
            ("fast/.hidden", "fast.=2Ehidden"),
            ("fast/x_y-z", "fast.x_y-z"),
        ];
        for (path, key) in cases {
            assert_eq!(encode(Path::new(path)).unwrap(), *key, "{path}");
            assert_eq!(decode(key), Some(Decoded::File(PathBuf::from(path))), "{key}");
        }
    }

    #[test]
    fn directory_markers_are_distinct_from_files() {
        let key = encode_dir(Path::new("fast/empty dir")).unwrap();
        assert_eq!(key, "fast.empty=20dir.=");
        assert_eq!(decode(&key), Some(Decoded::Dir(PathBuf::from("fast/empty dir"))));
        // A file literally named "=" encodes to "=3D", never to the marker.
        assert_eq!(encode(Path::new("fast/=")).unwrap(), "fast.=3D");
    }

    #[test]
    fn foreign_and_malformed_keys_are_ignored() {
        for key in ["", ".", "a..b", "a.=4", "a.=zz", "a.b*", "a.=2F", "a.=00", "a.=2E", "=2E=2E.x", "a/b", "a.=41", "_=32", "=5F", "=2d"] {
            assert_eq!(decode(key), None, "{key:?}");
        }
    }

    #[test]
    fn long_paths_are_refused() {
        let long = "x/".repeat(600) + "f";
        assert_eq!(encode(Path::new(&long)), Err(KeyError::TooLong));
        assert_eq!(encode(Path::new("")), Err(KeyError::NotAPath));
        assert_eq!(encode(Path::new("../x")), Err(KeyError::NotAPath));
    }

    proptest! {
        #[test]
        fn any_path_round_trips(parts in prop::collection::vec(prop::collection::vec(1u8..=255, 1..12), 1..5)) {
            let mut path = PathBuf::new();
            for part in &parts {
                let part: Vec<u8> = part.iter().map(|&b| if b == b'/' { b'x' } else { b }).collect();
                prop_assume!(part != b"." && part != b"..");
                path.push(OsStr::from_bytes(&part));
            }
            let key = encode(&path).unwrap();
            prop_assert!(key.bytes().all(|b| is_plain(b) || b == b'.' || b == b'='));
            prop_assert_eq!(key.split('.').count(), parts.len());
            prop_assert_eq!(decode(&key), Some(Decoded::File(path.clone())));
            let dir = encode_dir(&path).unwrap();
            prop_assert_eq!(decode(&dir), Some(Decoded::Dir(path)));
        }

        #[test]
        fn hostile_names_round_trip_as_valid_nats_keys(parts in prop::collection::vec(hostile_name(), 1..4)) {
            let path: PathBuf = parts.iter().map(|p| OsStr::from_bytes(p)).collect();
            prop_assume!(path.components().filter(|c| matches!(c, Component::Normal(_))).count() == parts.len());
            let len: usize = parts.iter().map(|p| p.iter().map(|&b| if is_plain(b) { 1 } else { 3 }).sum::<usize>()).sum::<usize>() + parts.len() - 1;
            if len + 2 > MAX_KEY_LEN {
                prop_assert_eq!(encode_dir(&path), Err(KeyError::TooLong));
                prop_assert_eq!(encode(&path).map(|_| ()), if len > MAX_KEY_LEN { Err(KeyError::TooLong) } else { Ok(()) });
                return Ok(());
            }
            let key = encode(&path).unwrap();
            prop_assert!(is_valid_nats_key(&key), "{:?} -> {:?}", path, key);
            prop_assert_eq!(decode(&key), Some(Decoded::File(path.clone())));
            let dir = encode_dir(&path).unwrap();
            prop_assert!(is_valid_nats_key(&dir), "{:?} -> {:?}", path, dir);
            prop_assert_eq!(decode(&dir), Some(Decoded::Dir(path)));
        }

        #[test]
        fn distinct_paths_never_share_a_key(a in lookalike_path(), b in lookalike_path()) {
            let (ka, kb) = (encode(&a), encode(&b));
            if a != b {
                prop_assert_ne!(&ka, &kb, "{:?} and {:?}", a, b);
            }
            // A file's key is never a directory's marker, whatever the two paths.
            if let (Ok(ka), Ok(db)) = (ka, encode_dir(&b)) {
                prop_assert_ne!(ka, db);
            }
        }

        #[test]
        fn a_key_decodes_only_if_it_is_the_paths_own_key(key in "[a.=2E3D0_*> -]{0,12}") {
            // One path, one key: a key another client wrote that spells a path differently
            // (`=41` for `A`) would be a second key for the same file.
            match decode(&key) {
                Some(Decoded::File(p)) => prop_assert_eq!(encode(&p), Ok(key.clone())),
                Some(Decoded::Dir(p)) => prop_assert_eq!(encode_dir(&p), Ok(key.clone())),
                None => {}
            }
        }
    }

    /// Bytes of one file name, biased to what breaks codecs: the escape and separator
    /// characters, NATS wildcards and tokens, whitespace, invalid UTF-8, and long names.
    fn hostile_name() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![
            3 => prop::sample::select(b". =*>$%\\\t\n\r_-~aAzZ09".to_vec()),
            1 => 0x80u8..=0xff,
            1 => 1u8..=0xff,
        ];
        prop_oneof![
            4 => prop::collection::vec(byte, 1..16),
            1 => prop::sample::select(vec![
                b"$JS".to_vec(), b"_INBOX".to_vec(), b"$KV".to_vec(), b"...".to_vec(), b".git".to_vec(),
                b"=".to_vec(), b"==".to_vec(), b"=2E".to_vec(), b"%2E".to_vec(), b"\xff\xfe".to_vec(),
            ]),
            1 => (1usize..=255).prop_map(|n| vec![b'.'; n]),
        ]
        .prop_map(|mut v| {
            v.iter_mut().filter(|b| **b == b'/' || **b == 0).for_each(|b| *b = b'x');
            v
        })
    }

    /// Paths over a tiny alphabet of separators and escapes, so near-collisions are common.
    fn lookalike_path() -> impl Strategy<Value = PathBuf> {
        "[a.=2E/]{1,8}".prop_filter_map("not a plain relative path", |s| {
            let p = PathBuf::from(s);
            p.components().all(|c| matches!(c, Component::Normal(_))).then_some(p)
        })
    }

    /// What a NATS KV key may be (async-nats' check, and the server's: no empty token).
    fn is_valid_nats_key(key: &str) -> bool {
        !key.is_empty()
            && key.len() <= MAX_KEY_LEN
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b))
            && key.split('.').all(|t| !t.is_empty())
    }
}
