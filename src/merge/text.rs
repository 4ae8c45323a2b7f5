//! Line-based three-way merge of text, and Markdown cut into YAML front matter and body.
//!
//! Text merges the way `git merge-file` does: changes on the two sides merge when they touch
//! different lines with at least one unchanged line between them, and the same change made on
//! both sides is made once; anything else is a conflict, which the caller decides like any
//! other (the newer version in place, the older beside it). There are no conflict markers in
//! the file: programs that read it back (a YAML front matter parser, say) get a whole version.
//!
//! The diff3 is the `diffy` crate's (`merge_bytes`) rather than our own: diff3's edge cases
//! (insertions at the same place, hunks that end without a newline, identical changes) are
//! where hand-written merges lose lines, and diffy is maintained with tests of exactly those,
//! compared against git's output. It works on bytes, and its result depends only on its three
//! inputs, so every node that merges the same versions (always passed newer, then older)
//! writes the same bytes. Our own tests pin the behaviour we promise.

/// Files larger than this are not merged line by line: diff3 costs grow with the product of
/// size and changes, and a merge runs inside the commit cycle. They conflict as a whole.
pub const MAX_TEXT_MERGE_BYTES: usize = 4 << 20;

/// How far git looks for a NUL byte to call a file binary.
const BINARY_PROBE: usize = 8000;

/// Whether `bytes` look binary (a NUL in the first 8000 bytes, git's test). Lines of a binary
/// file mean nothing, so such files are never merged line by line.
pub fn is_binary(bytes: &[u8]) -> bool {
    bytes[..bytes.len().min(BINARY_PROBE)].contains(&0)
}

/// Three-way merges text. `base` is `None` when both sides created the file. `None` when the
/// changes overlap, or a version is binary or too large.
pub fn merge(base: Option<&[u8]>, newer: &[u8], older: &[u8]) -> Option<Vec<u8>> {
    let base = base.unwrap_or_default();
    if [base, newer, older].iter().any(|t| t.len() > MAX_TEXT_MERGE_BYTES || is_binary(t)) {
        return None;
    }
    diffy::merge_bytes(base, newer, older).ok()
}

/// Whether a path is Markdown, by extension.
pub fn is_markdown(path: &std::path::Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("md") || e.eq_ignore_ascii_case("markdown"))
}

/// A Markdown document with YAML front matter, cut without losing a byte:
/// `open + yaml + close + body` is the whole text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrontMatter<'a> {
    /// The opening `---` line, with its line end (and a byte-order mark before it, if any).
    pub open: &'a str,
    /// The YAML between the delimiters.
    pub yaml: &'a str,
    /// The closing `---` (or `...`) line, with its line end if it has one.
    pub close: &'a str,
    /// Everything after the front matter.
    pub body: &'a str,
}

/// Cuts `text` at its front matter: a first line `---`, then YAML up to the next line that
/// is `---` or `...` (trailing blanks allowed, as Jekyll and gray-matter read it). `None`
/// when the text has no front matter.
pub fn front_matter(text: &str) -> Option<FrontMatter<'_>> {
    let start = if text.starts_with('\u{feff}') { '\u{feff}'.len_utf8() } else { 0 };
    let first_end = text[start..].find('\n').map(|i| start + i + 1)?;
    if text[start..first_end].trim_end() != "---" {
        return None;
    }
    let mut at = first_end;
    while at < text.len() {
        let end = text[at..].find('\n').map(|i| at + i + 1).unwrap_or(text.len());
        let line = text[at..end].trim_end();
        if line == "---" || line == "..." {
            return Some(FrontMatter {
                open: &text[..first_end],
                yaml: &text[first_end..at],
                close: &text[at..end],
                body: &text[end..],
            });
        }
        at = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn front_matter_is_cut_without_losing_a_byte() {
        for text in ["---\na: 1\n---\nbody\n", "---\r\na: 1\r\n---\r\n", "\u{feff}---\n---\n", "---\na: 1\n...", "---  \nx: [1]\n---\n\n# T\n"] {
            let f = front_matter(text).unwrap_or_else(|| panic!("{text:?}"));
            assert_eq!(format!("{}{}{}{}", f.open, f.yaml, f.close, f.body), text);
        }
        assert_eq!(front_matter("---\na: 1\n---\nbody\n").unwrap().yaml, "a: 1\n");
        for text in ["", "# Title\n---\n", "---\nno end\n", "----\n---\n", " ---\n---\n", "---"] {
            assert_eq!(front_matter(text), None, "{text:?}");
        }
    }

    #[test]
    fn binary_and_oversized_texts_are_not_merged() {
        assert_eq!(merge(Some(b"a\n"), b"a\0\n", b"b\n"), None);
        let big = vec![b'x'; MAX_TEXT_MERGE_BYTES + 1];
        assert_eq!(merge(Some(b"a\n"), &big, b"a\nb\n"), None);
    }
}
