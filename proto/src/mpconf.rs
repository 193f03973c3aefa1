//! Just enough of multipath.conf to tell a cluster admin, at start-up,
//! whether `reservation_key` is set the way the installed multipath-tools
//! needs it. No I/O here: [`parse`] takes the text, [`diagnose`] the
//! result and the version.
//!
//! What matters (multipath-tools' `select_reservation_key`): the key comes
//! from the map's `multipaths { multipath { ... } }` entry, else from
//! `defaults`. 0.9.x ignores the per-map entry (fixed in 0.10.0). From
//! 0.10.0 a key is required for every PR OUT but an unregister. A literal
//! key must equal the key the guest registers; guests that choose their own
//! keys need `reservation_key file`.
#![forbid(unsafe_code)]

/// Where `reservation_key` is set, and to what.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyConfig {
    /// The value in `defaults`, if any (`file`, or a key like `0x123:aptpl`).
    pub defaults: Option<String>,
    /// Values in `multipaths { multipath { ... } }` entries.
    pub per_map: Vec<String>,
}

impl KeyConfig {
    /// Merge another file (conf.d) into this one; later files override
    /// `defaults` values as multipath-tools does.
    pub fn merge(&mut self, other: KeyConfig) {
        if other.defaults.is_some() {
            self.defaults = other.defaults;
        }
        self.per_map.extend(other.per_map);
    }
}

/// Split a line into words: `#` and `!` start comments, double quotes
/// group words.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut in_word = false;
    for c in line.chars() {
        if quoted {
            if c == '"' {
                quoted = false;
            } else {
                cur.push(c);
            }
            continue;
        }
        match c {
            '"' => {
                quoted = true;
                in_word = true;
            }
            '#' | '!' => break,
            '{' | '}' => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
                out.push(c.to_string());
            }
            c if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

/// Extract the `reservation_key` settings from one configuration file.
pub fn parse(text: &str) -> KeyConfig {
    let mut cfg = KeyConfig::default();
    // Section names from the outermost in.
    let mut stack: Vec<String> = Vec::new();
    for line in text.lines() {
        let w = words(line);
        let mut i = 0;
        while i < w.len() {
            match w[i].as_str() {
                "}" => {
                    stack.pop();
                    i += 1;
                }
                "{" => {
                    stack.push(String::new());
                    i += 1;
                }
                name if w.get(i + 1).map(String::as_str) == Some("{") => {
                    stack.push(name.to_string());
                    i += 2;
                }
                keyword => {
                    if keyword == "reservation_key" {
                        if let Some(v) = w.get(i + 1).filter(|v| *v != "}") {
                            let path: Vec<&str> = stack.iter().map(String::as_str).collect();
                            match path.as_slice() {
                                ["defaults"] => cfg.defaults = Some(v.clone()),
                                ["multipaths", "multipath"] => cfg.per_map.push(v.clone()),
                                _ => {}
                            }
                        }
                    }
                    // The keyword's value: the words up to a closing brace.
                    i += 1;
                    while i < w.len() && w[i] != "}" {
                        i += 1;
                    }
                }
            }
        }
    }
    cfg
}

fn is_file(v: &str) -> bool {
    v == "file"
}

/// The warnings an admin should see for `cfg` with multipath-tools
/// `version` (major, minor, patch; None when unknown).
pub fn diagnose(cfg: &KeyConfig, version: Option<(u32, u32, u32)>) -> Vec<String> {
    let mut w = Vec::new();
    let per_map_honoured = version.is_none_or(|v| v >= (0, 10, 0));
    let old = version.is_some_and(|v| v < (0, 10, 0));
    match &cfg.defaults {
        Some(v) if is_file(v) => {}
        Some(v) => w.push(format!(
            "multipath.conf sets a fixed reservation_key {v}: guests must register exactly \
             that key through reservd, any other is refused; use 'reservation_key file' in \
             defaults for keys chosen by the guests"
        )),
        None if !cfg.per_map.is_empty() && !per_map_honoured => w.push(
            "multipath.conf sets reservation_key only in multipaths{} entries, which \
             multipath-tools 0.9.x ignores: put 'reservation_key file' in the defaults \
             section, or multipathd will not register keys on new or reinstated paths"
                .to_string(),
        ),
        None if !cfg.per_map.is_empty() => {}
        None if old => w.push(
            "multipath.conf sets no reservation_key: multipathd will not register keys on \
             new or reinstated paths; put 'reservation_key file' in the defaults section"
                .to_string(),
        ),
        None => w.push(
            "multipath.conf sets no reservation_key: multipath-tools 0.10 and later refuse \
             every PERSISTENT RESERVE OUT but an unregister (guests see LOGICAL UNIT \
             COMMUNICATION FAILURE); put 'reservation_key file' in the defaults section"
                .to_string(),
        ),
    }
    w
}

/// Parse a version like "0.9.4" or "0.9.4-3+deb12u2".
pub fn parse_version(s: &str) -> Option<(u32, u32, u32)> {
    let s = s.trim().trim_start_matches('v');
    let mut it = s
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty());
    Some((
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next().and_then(|p| p.parse().ok()).unwrap_or(0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM_CONF: &str = r#"
defaults {
    user_friendly_names yes
    find_multipaths strict
    # reservation_key 0x999
    reservation_key file
}
devices {
    device {
        vendor "LIO-ORG"
        reservation_key 0x1
    }
}
multipaths {
    multipath {
        wwid 36001405abcdef
        alias mpatha
        reservation_key "0x1234:aptpl"
    }
}
"#;

    #[test]
    fn finds_defaults_and_per_map_keys_only() {
        let c = parse(VM_CONF);
        assert_eq!(c.defaults.as_deref(), Some("file"));
        assert_eq!(c.per_map, vec!["0x1234:aptpl"]);
    }

    #[test]
    fn braces_on_one_line_and_comments() {
        let c = parse("defaults { reservation_key 0x5 } ! x\nmultipaths {\n multipath { reservation_key file }\n}\n");
        assert_eq!(c.defaults.as_deref(), Some("0x5"));
        assert_eq!(c.per_map, vec!["file"]);
        let c = parse("defaults {\n}\nblacklist {\n reservation_key file\n}\n");
        assert_eq!(c, KeyConfig::default());
    }

    #[test]
    fn defaults_file_is_quiet() {
        let c = parse(VM_CONF);
        assert!(diagnose(&c, Some((0, 9, 4))).is_empty());
        assert!(diagnose(&c, Some((0, 13, 0))).is_empty());
    }

    #[test]
    fn per_map_key_is_ignored_by_0_9() {
        let c = parse("multipaths { multipath { wwid x\n reservation_key file } }");
        let w = diagnose(&c, Some((0, 9, 4)));
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("0.9.x ignores"), "{w:?}");
        assert!(diagnose(&c, Some((0, 10, 0))).is_empty());
    }

    #[test]
    fn missing_key_severity_depends_on_version() {
        let c = KeyConfig::default();
        let w = diagnose(&c, Some((0, 9, 4)));
        assert!(w[0].contains("will not register keys"), "{w:?}");
        let w = diagnose(&c, Some((0, 12, 0)));
        assert!(w[0].contains("refuse"), "{w:?}");
        let w = diagnose(&c, None);
        assert!(w[0].contains("refuse"), "{w:?}");
    }

    #[test]
    fn fixed_key_is_flagged() {
        let c = parse("defaults {\n reservation_key 0xabc\n}");
        let w = diagnose(&c, Some((0, 9, 4)));
        assert!(w[0].contains("fixed reservation_key 0xabc"), "{w:?}");
    }

    #[test]
    fn merge_lets_later_files_override_defaults() {
        let mut c = parse("defaults { reservation_key 0x1 }");
        c.merge(parse(
            "defaults { reservation_key file }\nmultipaths { multipath { reservation_key 0x2 } }",
        ));
        assert_eq!(c.defaults.as_deref(), Some("file"));
        assert_eq!(c.per_map, vec!["0x2"]);
    }

    #[test]
    fn versions() {
        assert_eq!(parse_version("0.9.4"), Some((0, 9, 4)));
        assert_eq!(parse_version("0.9.4-3+deb12u2"), Some((0, 9, 4)));
        assert_eq!(parse_version("v0.14.3"), Some((0, 14, 3)));
        assert_eq!(parse_version("0.10"), Some((0, 10, 0)));
        assert_eq!(parse_version("x"), None);
    }
}
