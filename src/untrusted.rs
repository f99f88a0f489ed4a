//! Parsing YAML that someone else wrote (a pod's volume attributes): bounded before the parser
//! runs, and reported by field and kind of mistake, never by quoting the text.
//!
//! - [`check_depth`] refuses text nested deeper than a limit in one linear pass, before any
//!   YAML parser sees it. A YAML parser's cost on pathological nesting is far from linear (a
//!   120 KB flow sequence nested 60,000 deep took seconds to refuse), and a pod controls it.
//! - [`from_yaml`] turns the parser's message into one that names the failing field
//!   (`objects[0].filePermission`) and what was wrong with it. A
//!   YAML error message quotes the offending scalar (`invalid type: string "..."`); the text a
//!   pod wrote must not reach logs or the audit log (CVE-2023-2878 and CVE-2024-3744 were
//!   volume attributes in logs).
//!
//! What this module does not do: decide what a field means (callers own their types).

use serde::de::DeserializeOwned;

/// Nesting deeper than this is refused before parsing. Objects lists need four or five levels.
pub const MAX_DEPTH: usize = 32;

/// Where [`check_depth`] found nesting past the limit.
#[derive(Debug, PartialEq, Eq)]
pub struct TooDeep {
    /// 1-based line.
    pub line: usize,
    /// The item of the top-level sequence the line belongs to, when there is one.
    pub item: Option<usize>,
    /// The key the line starts with (`filePermission: [[[...`), when it is a plain name.
    pub key: Option<String>,
}

impl TooDeep {
    /// Where, as a field path below `what` (`objects[0].filePermission`) when the line says.
    pub fn place(&self, what: &str) -> String {
        let mut p = what.to_owned();
        if let Some(i) = self.item {
            p.push_str(&format!("[{i}]"));
        }
        if let Some(k) = &self.key {
            p.push('.');
            p.push_str(k);
        }
        p
    }
}

/// An upper bound of the nesting depth of `text` as YAML: indentation levels, compact
/// sequences on one line (`- - - x`) and flow brackets (`[`, `{`, counted even inside quotes,
/// so the bound stays an upper bound). Linear in the text; fails at the first line past `max`.
pub fn check_depth(text: &str, max: usize) -> Result<(), TooDeep> {
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    let mut block = 0usize;
    // The top-level sequence's items (`- ` at the shallowest column seen).
    let mut seq_col: Option<usize> = None;
    let mut item: Option<usize> = None;
    for (i, line) in text.lines().enumerate() {
        let body = line.trim_start_matches(' ');
        if flow == 0 && !body.is_empty() && !body.starts_with('#') {
            let col = line.len() - body.len();
            if body.starts_with("- ") || body == "-" {
                match seq_col {
                    Some(c) if c == col => item = Some(item.map_or(0, |n| n + 1)),
                    Some(c) if c < col => {}
                    _ => {
                        seq_col = Some(col);
                        item = Some(0);
                    }
                }
            }
            while indents.last().is_some_and(|&c| c >= col) {
                indents.pop();
            }
            indents.push(col);
            let mut chain = 0;
            let mut rest = body;
            while let Some(r) = rest
                .strip_prefix("- ")
                .or_else(|| rest.strip_prefix("? "))
                .or_else(|| rest.strip_prefix(": "))
            {
                chain += 1;
                rest = r.trim_start_matches(' ');
            }
            block = indents.len() + chain;
        }
        let too_deep = || TooDeep {
            line: i + 1,
            item,
            key: line_key(body),
        };
        if block > max {
            return Err(too_deep());
        }
        for b in line.bytes() {
            match b {
                b'[' | b'{' => {
                    flow += 1;
                    if block + flow > max {
                        return Err(too_deep());
                    }
                }
                b']' | b'}' => flow = flow.saturating_sub(1),
                _ => {}
            }
        }
    }
    Ok(())
}

/// The plain key a line starts with (`- filePermission: [...` gives `filePermission`).
fn line_key(body: &str) -> Option<String> {
    let body = body.trim_start_matches(['-', ' ']);
    let (k, _) = body.split_once(':')?;
    (!k.is_empty() && k.len() <= 64 && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        .then(|| k.to_owned())
}

/// Deserializes `text`; an error names the field path below `what` (e.g. `objects[0].mode`)
/// and the kind of mistake, and never contains the text.
pub fn from_yaml<T: DeserializeOwned>(text: &str, what: &str) -> Result<T, String> {
    if let Err(deep) = check_depth(text, MAX_DEPTH) {
        return Err(format!(
            "{}: nested more than {MAX_DEPTH} levels deep (line {}); refused before parsing",
            deep.place(what),
            deep.line
        ));
    }
    serde_norway::from_str(text).map_err(|e| {
        // serde_norway's message starts with the failing field's path (`.[0].mode: ...`).
        let msg = e.to_string();
        let (path, rest) = match msg.split_once(": ") {
            Some((p, r)) if p.starts_with('.') && !p.contains([' ', '"', '`']) => (p, r),
            _ => ("", msg.as_str()),
        };
        let place = match path.trim_start_matches('.') {
            "" => what.to_owned(),
            p if p.starts_with('[') => format!("{what}{p}"),
            p => format!("{what}.{p}"),
        };
        // Without a field (a syntax error), the position is all there is to go by.
        let position = match (path.is_empty(), e.location()) {
            (true, Some(l)) => format!(" (line {} column {})", l.line(), l.column()),
            _ => String::new(),
        };
        format!("{place}: {}{position}", describe(rest))
    })
}

/// The parser's message, reduced to what is safe to show: the kind of mistake and what was
/// expected (which comes from keybroker's own types), with anything quoted from the input
/// left out.
pub fn describe(msg: &str) -> String {
    let msg = msg.split(" at line ").next().unwrap_or(msg);
    let msg = msg.split(" at position ").next().unwrap_or(msg);
    // What was expected comes from keybroker's own types; it is the last ", expected" (the
    // input, quoted before it, may contain the same words).
    let expected = msg
        .rsplit_once(", expected ")
        .map(|(_, e)| e.to_owned())
        .unwrap_or_default();
    let found = |rest: &str| {
        rest.split(['"', '`', ','])
            .next()
            .unwrap_or("")
            .trim()
            .to_owned()
    };
    if let Some(rest) = msg.strip_prefix("invalid type: ") {
        return format!("wrong type: expected {expected}, found {}", found(rest));
    }
    if let Some(rest) = msg.strip_prefix("invalid value: ") {
        return format!("invalid value: expected {expected}, found {}", found(rest));
    }
    if let Some(rest) = msg.strip_prefix("invalid length ") {
        return format!("wrong number of items ({})", found(rest));
    }
    if msg.starts_with("unknown field ") {
        // The unknown name is the pod's text: say which names are allowed instead.
        return match expected.is_empty() {
            true => "unknown field".into(),
            false => format!("unknown field (expected {expected})"),
        };
    }
    if let Some(rest) = msg.strip_prefix("missing field ") {
        // The field name comes from keybroker's own types.
        return format!("missing field {rest}");
    }
    if msg.starts_with("unknown variant ") {
        return format!("unknown value (expected {expected})");
    }
    if msg.contains("recursion limit exceeded") {
        return "nested too deeply".into();
    }
    redact(msg)
}

/// Replaces anything between quotes or backticks with `…`.
fn redact(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(256));
    let mut inside: Option<char> = None;
    for c in s.chars() {
        match inside {
            Some(q) if c == q => {
                out.push('…');
                out.push(c);
                inside = None;
            }
            Some(_) => {}
            None => {
                out.push(c);
                if c == '"' || c == '`' || c == '\'' {
                    inside = Some(c);
                }
            }
        }
        if out.len() > 240 {
            out.push('…');
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    #[allow(dead_code)]
    struct Obj {
        object_name: String,
        file_permission: Option<u32>,
    }

    #[test]
    fn deep_nesting_is_refused_in_linear_time_with_the_line() {
        let deep = format!(
            "- objectName: a\n  filePermission: {}{}\n",
            "[".repeat(60_000),
            "]".repeat(60_000)
        );
        let e = from_yaml::<Vec<Obj>>(&deep, "objects").unwrap_err();
        assert!(
            e.starts_with("objects[0].filePermission: nested more than 32") && e.contains("line 2"),
            "{e}"
        );
        let second = format!(
            "- objectName: a\n- objectName: b\n  args: {}\n",
            "{".repeat(40)
        );
        let e = from_yaml::<Vec<Obj>>(&second, "objects").unwrap_err();
        assert!(e.starts_with("objects[1].args: nested"), "{e}");
        let compact = format!("{}x\n", "- ".repeat(100));
        assert_eq!(check_depth(&compact, MAX_DEPTH).unwrap_err().line, 1);
        let indented: String = (0..40)
            .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
            .collect();
        assert_eq!(check_depth(&indented, MAX_DEPTH).unwrap_err().line, 33);
        // Ordinary objects lists, in both Secrets Store dialects, pass.
        let vault = "- objectName: db\n  secretPath: database/creds/app\n  secretArgs:\n    ttl: 1h\n    extra: {a: [1, 2]}\n  template: \"pg://{{username}}:{{password}}@db\"\n";
        assert_eq!(check_depth(vault, MAX_DEPTH), Ok(()));
        let azure = "array:\n  - |\n    objectName: db-pass\n    objectType: secret\n  - |\n    objectName: tls\n";
        assert_eq!(check_depth(azure, MAX_DEPTH), Ok(()));
    }

    #[test]
    fn errors_name_the_field_and_never_quote_the_text() {
        let cases = [
            (
                "- objectName: a\n  filePermission: \"TOPSECRET-1\"\n",
                "objects[0].filePermission: wrong type",
            ),
            (
                "- objectName: a\n  TOPSECRET-2: 1\n",
                "objects[0]: unknown field (expected `objectName` or `filePermission`)",
            ),
            (
                "- objectName: a\n  filePermission: \"TOPSECRET, expected x\"\n",
                "objects[0].filePermission: wrong type: expected u32, found string",
            ),
            (
                "- objectName: a\n  TOPSECRET-3 has spaces: 1\n",
                "objects[0]: unknown field",
            ),
            (
                "- filePermission: 1\n",
                "objects[0]: missing field `objectName`",
            ),
            (
                "objectName: TOPSECRET-4\n",
                "objects: wrong type: expected a sequence",
            ),
            ("- objectName: [TOPSECRET-5\n", "objects"),
        ];
        for (text, want) in cases {
            let e = from_yaml::<Vec<Obj>>(text, "objects").unwrap_err();
            assert!(e.starts_with(want), "{text:?} -> {e}");
            assert!(!e.contains("TOPSECRET"), "{text:?} -> {e}");
        }
    }
}
