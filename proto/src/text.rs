//! Untrusted text (payloads, instance names) made safe to print as one line
//! for people and line-reading scripts. Pure: no I/O.

/// `text` as one line of plain text: line breaks, tabs, terminal escapes
/// and every other control character (and the bidirectional-text
/// overrides) are written as escapes, and `\` as `\\`, so a payload or a
/// name can neither print a second line that looks like someone else's nor
/// drive the terminal. JSON output carries the exact text instead.
pub fn one_line(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            // Line and paragraph separators end a line for many readers
            // (Python's `splitlines`), so they are escaped too.
            c if c.is_control()
                || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') =>
            {
                out.push_str(&format!("\\u{{{:x}}}", c as u32));
            }
            c => out.push(c),
        }
    }
    out
}

/// An error line with its target put in: `"what; next"` becomes
/// `"what (to); next"`, and a line without a next step gets ` (to)` at the
/// end.
pub fn with_target(text: &str, to: &str) -> String {
    match text.split_once("; ") {
        Some((what, next)) => format!("{what} ({to}); {next}"),
        None => format!("{text} ({to})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_output_is_one_line_whatever_the_payload() {
        assert_eq!(one_line("hi"), "hi");
        assert_eq!(
            one_line("hi\ninstance-003/admin: approved"),
            "hi\\ninstance-003/admin: approved"
        );
        assert_eq!(one_line("a\r\tb\\n"), "a\\r\\tb\\\\n");
        assert_eq!(one_line("\u{1b}[2J"), "\\u{1b}[2J");
        assert_eq!(one_line("\u{202e}evil"), "\\u{202e}evil");
        assert_eq!(one_line("你好，小包子!"), "你好，小包子!");
        for s in ["x\ny", "\u{85}", "\u{2028}", "\u{7f}"] {
            let line = one_line(s);
            assert_eq!(line.lines().count(), 1, "{s:?}");
            assert!(
                !line.contains(['\n', '\r', '\u{85}', '\u{7f}', '\u{2028}', '\u{2029}']),
                "{s:?}"
            );
        }
    }
}
