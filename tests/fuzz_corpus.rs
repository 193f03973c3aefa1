//! Replays the fuzz corpora and the inputs of past fuzz findings through
//! the same target functions libFuzzer runs (fuzz/src/targets.rs), plus a
//! few deterministic mutations of each, so that every `cargo test`
//! exercises the parsers and the server with hostile input without the
//! fuzzer.

#[path = "../fuzz/src/targets.rs"]
mod targets;

use std::path::Path;

type Target = fn(&[u8]);

const TARGETS: &[(&str, Target)] = &[
    ("wire", targets::wire),
    ("cdb", targets::cdb),
    ("params", targets::params),
    ("mpath_xlate", targets::mpath_xlate),
    ("prin", targets::prin),
    ("server", targets::server),
];

/// The files of fuzz/corpus/NAME and fuzz/regressions/NAME.
fn inputs(name: &str) -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut out = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(rd) = std::fs::read_dir(root.join(dir).join(name)) else {
            continue;
        };
        for e in rd {
            let p = e.unwrap().path();
            out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

/// xorshift64: deterministic, so a failure names a reproducible input.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn mutate(input: &[u8], seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = input.to_vec();
    for _ in 0..=(next(&mut s) % 4) {
        let r = next(&mut s);
        match r % 4 {
            0 if !v.is_empty() => {
                let i = (r >> 8) as usize % v.len();
                v[i] ^= 1 << ((r >> 4) % 8);
            }
            1 if !v.is_empty() => {
                let i = (r >> 8) as usize % v.len();
                v[i] = (r >> 32) as u8;
            }
            2 => v.truncate((r >> 8) as usize % (v.len() + 1)),
            _ => {
                let i = (r >> 8) as usize % (v.len() + 1);
                v.insert(i, (r >> 40) as u8);
            }
        }
    }
    v
}

fn replay(name: &str, target: Target, mutations: u64) {
    let inputs = inputs(name);
    assert!(!inputs.is_empty(), "no corpus for {name}");
    for (path, bytes) in &inputs {
        target(bytes);
        for seed in 0..mutations {
            let m = mutate(bytes, seed);
            let r = std::panic::catch_unwind(|| target(&m));
            assert!(r.is_ok(), "{path}, mutation {seed}: {m:02x?}");
        }
    }
}

#[test]
fn parser_corpora_and_mutations() {
    for (name, target) in TARGETS.iter().filter(|(n, _)| *n != "server") {
        replay(name, *target, 500);
    }
}

#[test]
fn server_corpus_and_mutations() {
    let (name, target) = TARGETS.iter().find(|(n, _)| *n == "server").unwrap();
    replay(name, *target, 30);
}
