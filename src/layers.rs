//! The layer rule of the crate docs, checked on the sources: every path into another
//! top-level module (`crate::m…`, `crate::{m…}`, or `super::` up to the crate root) must
//! point down the list.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The layer list of the crate docs above, bottom up.
fn layers() -> Vec<String> {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    lib.lines()
        .filter_map(|l| l.strip_prefix("//! "))
        .filter_map(|l| {
            let (n, rest) = l.split_once(". [`")?;
            n.parse::<u32>().ok()?;
            Some(rest.split_once('`')?.0.to_owned())
        })
        .collect()
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code with comments, strings and character literals blanked out (newlines kept, so
/// line numbers hold): what is left can be scanned for paths and braces.
fn code_only(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |out: &mut String, ch: char| out.push(if ch == '\n' { '\n' } else { ' ' });
    while i < c.len() {
        let rest = &c[i..];
        if rest.starts_with(&['/', '/']) {
            while i < c.len() && c[i] != '\n' {
                blank(&mut out, c[i]);
                i += 1;
            }
        } else if rest.starts_with(&['/', '*']) {
            let mut depth = 0;
            while i < c.len() {
                if c[i..].starts_with(&['/', '*']) {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if c[i..].starts_with(&['*', '/']) {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
        } else if let Some(hashes) = raw_string_at(&c, i) {
            // A raw string: r"…", r#"…"#, br"…".
            let close: Vec<char> = std::iter::once('"')
                .chain(std::iter::repeat_n('#', hashes))
                .collect();
            let start = i + 2 + hashes;
            let end = (start..c.len())
                .find(|&j| c[j..].starts_with(&close))
                .map_or(c.len(), |j| j + close.len());
            for &ch in &c[i..end] {
                blank(&mut out, ch);
            }
            i = end;
        } else if c[i] == '"' {
            blank(&mut out, c[i]);
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    blank(&mut out, c[i]);
                    i += 1;
                }
                if i < c.len() {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
            if i < c.len() {
                blank(&mut out, c[i]);
                i += 1;
            }
        } else if c[i] == '\'' && (rest.get(2) == Some(&'\'') || (rest.get(1) == Some(&'\\'))) {
            // A character literal ('x', '\n', '\u{…}'); a lifetime has no closing quote.
            // An escape's own character may be a quote ('\''): the search starts after it.
            let from = if rest[1] == '\\' { i + 3 } else { i + 2 };
            let end = (from..c.len())
                .find(|&j| c[j] == '\'')
                .map_or(c.len(), |j| j + 1);
            for &ch in &c[i..end] {
                blank(&mut out, ch);
            }
            i = end;
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// At `c[i] == 'r'` opening a raw string (`r"`, `r#"`, `br"`, not the end of a word): its
/// number of `#`.
fn raw_string_at(c: &[char], i: usize) -> Option<usize> {
    let word_before = match i.checked_sub(1).map(|j| c[j]) {
        Some('b') => i >= 2 && is_ident(c[i - 2]),
        Some(p) => is_ident(p),
        None => false,
    };
    if c[i] != 'r' || word_before {
        return None;
    }
    let hashes = c[i + 1..].iter().take_while(|&&h| h == '#').count();
    (c.get(i + 1 + hashes) == Some(&'"')).then_some(hashes)
}

fn is_ident(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

/// The first segment of each path in a `{…}` group that starts at `group[0]`.
fn group_heads(group: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 0;
    let mut at_start = true;
    let mut word = String::new();
    for ch in group.chars() {
        match ch {
            '{' => {
                depth += 1;
                at_start = depth == 1;
            }
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            ',' if depth == 1 => at_start = true,
            _ if at_start && depth == 1 && is_ident(ch) => word.push(ch),
            _ if !word.is_empty() => {
                heads.push(std::mem::take(&mut word));
                at_start = false;
            }
            _ => {}
        }
    }
    heads.extend((!word.is_empty()).then_some(word));
    heads
}

/// `(line, top-level module)` of every path in `code` that leaves `module` (the file's
/// module path, e.g. `["tee", "record"]`) for another top-level module.
fn edges(code: &str, module: &[String]) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    // Inline modules (`mod tests {`) nest below the file's module.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0usize;
    let bytes: Vec<char> = code.chars().collect();
    let mut line = 1;
    let mut i = 0;
    let word_at = |i: usize| {
        bytes[i..]
            .iter()
            .take_while(|&&ch| is_ident(ch))
            .collect::<String>()
    };
    while i < bytes.len() {
        let ch = bytes[i];
        let boundary = i == 0 || !(is_ident(bytes[i - 1]) || bytes[i - 1] == ':');
        if ch == '\n' {
            line += 1;
        } else if ch == '{' {
            depth += 1;
        } else if ch == '}' {
            depth = depth.saturating_sub(1);
            inline.retain(|(_, d)| *d <= depth);
        } else if boundary && is_ident(ch) {
            let word = word_at(i);
            let after = i + word.len();
            let rest: String = bytes[after..].iter().take(200).collect();
            if word == "mod" {
                let rest = rest.trim_start();
                let name: String = rest.chars().take_while(|&c| is_ident(c)).collect();
                if rest[name.len()..].trim_start().starts_with('{') {
                    inline.push((name, depth + 1));
                }
            } else if word == "crate" && rest.starts_with("::") {
                let target = rest[2..].trim_start();
                if target.starts_with('{') {
                    found.extend(group_heads(target).into_iter().map(|h| (line, h)));
                } else {
                    let head: String = target.chars().take_while(|&c| is_ident(c)).collect();
                    found.push((line, head));
                }
            } else if word == "super" {
                let mut path: Vec<String> = module.to_vec();
                path.extend(inline.iter().map(|(n, _)| n.clone()));
                let mut j = i;
                while bytes[j..].starts_with(&['s', 'u', 'p', 'e', 'r', ':', ':']) {
                    path.pop();
                    j += 7;
                }
                if path.is_empty() {
                    let target: String = bytes[j..].iter().take(200).collect();
                    if target.starts_with('{') {
                        found.extend(group_heads(&target).into_iter().map(|h| (line, h)));
                    } else {
                        found.push((line, word_at(j)));
                    }
                }
                i = j.max(i + 1);
                continue;
            }
            i = after;
            continue;
        }
        i += 1;
    }
    found.retain(|(_, head)| Some(head) != module.first() && head != "self");
    found
}

#[test]
fn layers_only_point_down() {
    let order = layers();
    let rank: BTreeMap<&str, usize> = order
        .iter()
        .enumerate()
        .map(|(i, m)| (m.as_str(), i))
        .collect();
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    // Every module of the crate, public or not, but this test's own (declared under
    // `#[cfg(test)]`).
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|l| {
            l.strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("mod "))?
                .strip_suffix(';')
        })
        .filter(|m| *m != "layers")
        .collect();
    let mut unlisted: Vec<&str> = declared
        .iter()
        .filter(|m| !rank.contains_key(*m))
        .copied()
        .collect();
    unlisted.extend(rank.keys().filter(|m| !declared.contains(m)));
    assert!(
        unlisted.is_empty(),
        "modules declared in lib.rs and the layer list differ: {unlisted:?}"
    );

    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut up = Vec::new();
    for file in files {
        let rel = file.strip_prefix(src()).unwrap();
        let mut module: Vec<String> = rel
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        let last = module.pop().unwrap();
        let stem = last.trim_end_matches(".rs");
        if stem != "mod" {
            module.push(stem.to_owned());
        }
        let Some(&from) = module.first().and_then(|m| rank.get(m.as_str())) else {
            continue; // lib.rs and main.rs are above every layer
        };
        let code = code_only(&std::fs::read_to_string(&file).unwrap());
        for (line, to) in edges(&code, &module) {
            match rank.get(to.as_str()) {
                Some(&rank_to) if rank_to < from => {}
                Some(_) => up.push(format!("{}:{line}: {} → {to}", rel.display(), module[0])),
                None => {} // not a module: an item at the crate root
            }
        }
    }
    assert!(
        up.is_empty(),
        "edges that point up the layer list of src/lib.rs:\n{}",
        up.join("\n")
    );
}

#[test]
fn the_scan_finds_every_form_of_path() {
    let module = ["tee".to_owned(), "record".to_owned()];
    let code = code_only(concat!(
        "use crate::config::policy;\n",
        "use crate::{decide::Route, tee::spool, policy as p};\n",
        "// crate::app in a comment\n",
        "let s = \"crate::control\"; let c = '{';\n",
        "mod tests { use super::super::super::audit; use super::super::spool; }\n",
        "fn f<'a>(x: &'a str) -> char { crate::proxy::f(); '\\'' }\n",
        "const R: &str = r#\"crate::app \"{\"#; mod m { use super::super::super::{control, self}; }\n",
    ));
    let found: Vec<(usize, String)> = edges(&code, &module);
    let names: Vec<&str> = found.iter().map(|(_, m)| m.as_str()).collect();
    assert_eq!(
        names,
        ["config", "decide", "policy", "audit", "proxy", "control"]
    );
    assert_eq!(found[3].0, 5);
}
