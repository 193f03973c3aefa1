//! reservd's metrics, as its metrics socket serves them (Prometheus' text
//! format): fetching them, and reading the samples back (`reservdctl
//! metrics --json`, the tests).
#![forbid(unsafe_code)]

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

/// Where `reservdctl metrics` looks unless told: the path that
/// docs/metrics.md suggests, in reservd.service's runtime directory.
pub const DEFAULT_SOCKET: &str = "/run/reservd/metrics.sock";

/// Connect to the metrics socket at `path` and read the text until EOF.
pub fn fetch(path: &Path, timeout: Duration) -> std::io::Result<String> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(timeout))?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

/// One sample: a metric's name, its labels in order, its value.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, if the sample has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether the sample has every label of `labels` with that value.
    pub fn has(&self, labels: &[(&str, &str)]) -> bool {
        labels.iter().all(|(k, v)| self.label(k) == Some(*v))
    }
}

/// The samples of `text`, in order; comments and blank lines skipped. A
/// line that is not a sample is an error naming it.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| parse_line(l).ok_or_else(|| format!("not a sample: {l:?}")))
        .collect()
}

fn parse_line(l: &str) -> Option<Sample> {
    let (series, value) = l.rsplit_once(' ')?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    let (name, labels) = match series.split_once('{') {
        None => (series, Vec::new()),
        Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)?),
    };
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':');
    ok.then(|| Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// `k="v",k2="v2"` with the text format's escapes (`\\`, `\"`, `\n`).
fn parse_labels(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    while chars.peek().is_some() {
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if chars.next()? != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '"' => break,
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                c => value.push(c),
            }
        }
        out.push((key.trim().to_string(), value));
        match chars.next() {
            None => break,
            Some(',') => {}
            Some(_) => return None,
        }
    }
    Some(out)
}

/// The sum of the values of the samples named `name` that have `labels`
/// (0 when there are none).
pub fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && s.has(labels))
        .map(|s| s.value)
        .sum()
}

/// `reservdctl metrics --json`: the samples as one JSON array of
/// `{"name", "labels": {..}, "value"}`.
pub fn json(samples: &[Sample]) -> String {
    #[derive(Serialize)]
    struct S<'a> {
        name: &'a str,
        labels: serde_json::Map<String, serde_json::Value>,
        value: Value,
    }
    /// A number, or the text format's spelling of an infinity.
    #[derive(Serialize)]
    #[serde(untagged)]
    enum Value {
        Number(f64),
        Text(&'static str),
    }
    let doc: Vec<S<'_>> = samples
        .iter()
        .map(|s| S {
            name: &s.name,
            labels: s
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect(),
            value: if s.value.is_finite() {
                Value::Number(s.value)
            } else if s.value > 0.0 {
                Value::Text("+Inf")
            } else if s.value < 0.0 {
                Value::Text("-Inf")
            } else {
                Value::Text("NaN")
            },
        })
        .collect();
    serde_json::to_string(&doc).expect("samples serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP reservd_info reservd's version.\n\
        # TYPE reservd_info gauge\n\
        reservd_info{version=\"0.1.0\"} 1\n\
        reservd_commands_total{command=\"PR_IN\",service_action=\"READ_KEYS\",status=\"GOOD\",backend=\"sgio\"} 3\n\
        reservd_commands_total{command=\"PR_OUT\",service_action=\"REGISTER\",status=\"GOOD\",backend=\"sgio\"} 2\n\
        x_bucket{le=\"+Inf\"} 5\n\
        reservd_map_active_paths{map=\"m\\\"a\\\\b\\nc\",wwid=\"\"} 2\n\
        reservd_start_time_seconds 1700000000.25\n";

    #[test]
    fn samples_are_read_back_with_their_labels() {
        let s = parse(TEXT).unwrap();
        assert_eq!(s.len(), 6);
        assert_eq!(s[0].name, "reservd_info");
        assert_eq!(s[0].label("version"), Some("0.1.0"));
        assert_eq!(sum(&s, "reservd_commands_total", &[]), 5.0);
        assert_eq!(
            sum(&s, "reservd_commands_total", &[("command", "PR_IN")]),
            3.0
        );
        assert_eq!(
            sum(&s, "reservd_commands_total", &[("backend", "multipath")]),
            0.0
        );
        assert_eq!(s[4].label("map"), Some("m\"a\\b\nc"));
        assert_eq!(s[4].label("wwid"), Some(""));
        assert_eq!(s[5].value, 1_700_000_000.25);
        assert_eq!(s[3].label("le"), Some("+Inf"));
    }

    #[test]
    fn what_is_not_a_sample_is_an_error() {
        for bad in [
            "x{a=\"1\" 2",
            "x 1 2 z",
            "x{a=1} 2",
            "{a=\"1\"} 2",
            "x{a=\"1\"}x 3",
            "x",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse("\n# only comments\n").unwrap(), vec![]);
    }

    #[test]
    fn json_is_one_array_with_label_objects() {
        let s = parse("a{k=\"v\",l=\"w\"} 2\nb 0.5\nc +Inf\n").unwrap();
        assert_eq!(
            json(&s),
            "[{\"name\":\"a\",\"labels\":{\"k\":\"v\",\"l\":\"w\"},\"value\":2.0},\
             {\"name\":\"b\",\"labels\":{},\"value\":0.5},\
             {\"name\":\"c\",\"labels\":{},\"value\":\"+Inf\"}]"
        );
    }
}
