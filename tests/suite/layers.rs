//! The crate's modules form layers: no module uses another that uses it back, directly or around
//! a loop. Reads `src/**/*.rs` (the directory from `CARGO_MANIFEST_DIR` at run time), takes
//! every `crate::…` and `super::…` path outside comments and `#[cfg(test)]` modules as an edge
//! to the deepest module it names, and fails on any cycle, printing it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module path (`export::vae`, `""` for the crate root) of each library file, with its text.
fn modules(src: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if parts == ["main"] || parts.first().is_some_and(|p| p == "bin") {
                continue; // the binary is its own crate
            }
            if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
                parts.pop();
            }
            let text = std::fs::read_to_string(&path).expect("read source");
            out.insert(parts.join("::"), text);
        }
    }
    out
}

/// The code of a file as (text whose `super` is the file's parent, text whose `super` is the
/// file itself): comments dropped, `#[cfg(test)]` modules dropped, top-level inline modules apart.
fn code(text: &str) -> (String, String) {
    let (mut outer, mut inner) = (String::new(), String::new());
    let (mut in_module, mut in_test, mut after_cfg_test) = (false, false, false);
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("//") {
            continue;
        }
        if in_module {
            if line == "}" {
                in_module = false;
            } else if !in_test {
                inner.push_str(line);
                inner.push('\n');
            }
            continue;
        }
        let opens_module = !line.starts_with(' ')
            && line.ends_with('{')
            && (trimmed.starts_with("mod ")
                || trimmed.starts_with("pub") && line.contains(" mod "));
        if opens_module {
            in_module = true;
            in_test = after_cfg_test;
        } else {
            outer.push_str(line);
            outer.push('\n');
        }
        if !trimmed.is_empty() {
            after_cfg_test = trimmed == "#[cfg(test)]";
        }
    }
    (outer, inner)
}

/// Every path a `use` tree or expression starting at `rest` names, as segments after `base`.
fn paths(rest: &str, base: &[String], out: &mut Vec<Vec<String>>) {
    let mut segs = base.to_vec();
    let mut s = rest;
    loop {
        let ident: String = s
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if ident.is_empty() {
            if let Some(group) = s.strip_prefix('{') {
                let mut depth = 0;
                let mut start = 0;
                for (i, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => {
                            paths(group[start..i].trim(), &segs, out);
                            return;
                        }
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            paths(group[start..i].trim(), &segs, out);
                            start = i + 1;
                        }
                        _ => {}
                    }
                }
            }
            break;
        }
        s = &s[ident.len()..];
        if ident != "self" {
            segs.push(ident);
        }
        match s.strip_prefix("::") {
            Some(next) => s = next.trim_start(),
            None => break,
        }
    }
    out.push(segs);
}

/// The deepest known module a path names.
fn resolve(path: &[String], known: &BTreeMap<String, String>) -> Option<String> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].join("::"))
        .find(|m| known.contains_key(m))
}

/// Edges from each module to the modules it names.
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let known = modules(src);
    let mut edges = BTreeMap::new();
    for (module, text) in &known {
        let own: Vec<String> = module
            .split("::")
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        let parent = &own[..own.len().saturating_sub(1)];
        let (outer, inner) = code(text);
        let mut found = Vec::new();
        for (body, super_base) in [(&outer, parent), (&inner, &own[..])] {
            for (i, _) in body.match_indices("crate::") {
                let before = body[..i].chars().last();
                if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
                    paths(&body[i + "crate::".len()..], &[], &mut found);
                }
            }
            for (i, _) in body.match_indices("super::") {
                let before = body[..i].chars().last();
                if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                    continue; // `super::super::` is read from its first `super`
                }
                let mut base = super_base.to_vec();
                let mut rest = &body[i + "super::".len()..];
                while let Some(next) = rest.strip_prefix("super::") {
                    base.pop();
                    rest = next;
                }
                paths(rest, &base, &mut found);
            }
        }
        let targets: BTreeSet<String> = found
            .iter()
            .filter_map(|p| resolve(p, &known))
            .filter(|t| t != module && !t.is_empty())
            .collect();
        edges.insert(module.clone(), targets);
    }
    edges
}

/// The modules of each cycle (strongly connected component of more than one module), sorted.
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_string()];
        while let Some(m) = stack.pop() {
            for t in edges.get(&m).into_iter().flatten() {
                if seen.insert(t.clone()) {
                    stack.push(t.clone());
                }
            }
        }
        seen
    };
    let reached: BTreeMap<&String, BTreeSet<String>> =
        edges.keys().map(|m| (m, reach(m))).collect();
    let mut out: Vec<Vec<String>> = Vec::new();
    for (m, from_m) in &reached {
        if !from_m.contains(*m) || out.iter().any(|c| c.contains(m)) {
            continue;
        }
        let members: Vec<String> = from_m
            .iter()
            .filter(|t| reached[t].contains(*m))
            .cloned()
            .collect();
        out.push(members);
    }
    out
}

/// A readable loop through one cycle: `a -> b -> … -> a`, with each edge in the cycle.
fn describe(cycle: &[String], edges: &BTreeMap<String, BTreeSet<String>>) -> String {
    let inside = |m: &String| -> Vec<String> {
        edges[m]
            .iter()
            .filter(|t| cycle.contains(t))
            .cloned()
            .collect()
    };
    let lines: Vec<String> = cycle
        .iter()
        .map(|m| format!("  {m} uses {}", inside(m).join(", ")))
        .collect();
    format!("{}\n{}", cycle.join(" <-> "), lines.join("\n"))
}

#[test]
fn modules_form_layers_without_cycles() {
    let root = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let edges = graph(&Path::new(&root).join("src"));
    assert!(
        edges.contains_key("pipeline") && edges["pipeline"].contains("store"),
        "the module graph was not read (pipeline should use store): {edges:?}"
    );
    let found: Vec<String> = cycles(&edges).iter().map(|c| describe(c, &edges)).collect();
    assert!(
        found.is_empty(),
        "modules use each other around a loop; move what both need down into the lower module \
         or a small leaf module:\n{}",
        found.join("\n")
    );
}
