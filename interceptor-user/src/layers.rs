//! Keeps the modules layered (see [`crate::conn`]): every `crate::` path in
//! a module's sources names itself or a module of a lower layer. Comments
//! are skipped, so doc links may point anywhere.

use std::path::Path;

/// Bottom to top; a module imports only modules of lower layers.
const LAYERS: &[&[&str]] = &[
    &["handover", "notify", "identity", "sql"],
    &["policy"],
    &["audit", "tls", "kube"],
    &["conn"],
    &["ebpf", "netns", "blocklist", "approval"],
    &["proxy"],
    &["protocol"],
    &["worker", "block", "control"],
    &["cli"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The modules named by the `crate::` paths of `code`: `crate::a::b` and
/// each top-level name of `crate::{a::b, c}`.
fn crate_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let boundary = rest[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
        rest = &rest[i + "crate::".len()..];
        if !boundary {
            continue;
        }
        let Some(group) = rest.trim_start().strip_prefix('{') else {
            out.push(ident(rest));
            continue;
        };
        let (mut depth, mut start) = (0usize, 0usize);
        for (j, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    out.push(ident(group[start..].trim_start()));
                    break;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    out.push(ident(group[start..].trim_start()));
                    start = j + 1;
                }
                _ => {}
            }
        }
    }
    out.retain(|m| !m.is_empty());
    out
}

fn without_comments(text: &str) -> String {
    text.lines()
        .map(|l| {
            let t = l.trim_start();
            if t.starts_with("//") { "" } else { l }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn modules_import_only_downward() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut wrong = Vec::new();
    for f in files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_owned();
        if matches!(module.as_str(), "lib" | "main" | "layers") {
            continue;
        }
        let Some(own) = layer(&module) else {
            wrong.push(format!("{module}: not in LAYERS; give it a layer"));
            continue;
        };
        let code = without_comments(&std::fs::read_to_string(&f).unwrap());
        for dep in crate_paths(&code) {
            if dep == module {
                continue;
            }
            match layer(&dep) {
                Some(l) if l < own => {}
                _ => wrong.push(format!("{}: imports crate::{dep}", rel.display())),
            }
        }
    }
    wrong.sort();
    wrong.dedup();
    assert!(
        wrong.is_empty(),
        "imports against the layering:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn paths_are_found_in_groups_and_alone() {
    let code = "use crate::{a::{b, c}, d};\nlet x = crate::e::f(); notcrate::g; crate::{\n  h,\n};";
    assert_eq!(crate_paths(code), ["a", "d", "e", "h"]);
}
