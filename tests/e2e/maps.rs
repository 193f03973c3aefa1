//! Guest scenario: two multipath maps driven through one reservd at once.
//! PR OUT commands on different maps, and their libmpathpersist calls, run
//! side by side (multipath-tools 0.8.6 and later); this proves, on each
//! release the group runs on, that they do so safely: every answer is the
//! one a single-path LU gives one initiator, and after each step every
//! path of each map carries that map's key and reservation, never the
//! other map's. Needs the bed's second map (`RESERVD_VM_MAPS=2`).

use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use reservd_proto::cdb::{pr_type, prin_sa, prout_sa};
use reservd_proto::prin;

use super::{
    device_keys, device_reservation, env, expect_good, keys, past_ua, pr_in, pr_out, reservd,
    reset_lun, TestResult,
};

/// Rounds of register, read, reserve, release per map.
const ROUNDS: u64 = 12;

/// A map of the bed: its device and its two paths.
struct Map {
    dev: PathBuf,
    paths: Vec<PathBuf>,
}

fn maps() -> Result<Vec<Map>, String> {
    let devs = env("RESERVD_MAPS_DEVS");
    let paths = env("RESERVD_MAPS_PATHS");
    let maps: Vec<Map> = devs
        .split_whitespace()
        .zip(paths.split_whitespace())
        .map(|(d, p)| Map {
            dev: PathBuf::from(d),
            paths: p.split(',').map(PathBuf::from).collect(),
        })
        .collect();
    check!(
        maps.len() >= 2 && maps.iter().all(|m| m.paths.len() == 2),
        "two maps of two paths each expected (RESERVD_VM_MAPS=2): {devs} / {paths}"
    );
    Ok(maps)
}

/// One map's rounds, through its own connection to `socket`'s reservd.
fn rounds(d: &super::Daemon, map: &Map, base: u64, start: &Barrier) -> Result<Duration, String> {
    let mut c = d.client()?;
    let dev = &map.dev;
    let what = |s: &str, i: u64| format!("{} round {i}: {s}", dev.display());
    start.wait();
    let t = Instant::now();
    for i in 0..ROUNDS {
        let k = base + i;
        // A new key each round: the library registers it on both paths
        // and tells multipathd.
        let r = past_ua(|| pr_out(&mut c, dev, prout_sa::REGISTER_AND_IGNORE, 0, &keys(0, k)))?;
        expect_good(&r, &what("REGISTER AND IGNORE EXISTING KEY", i))?;
        let r = past_ua(|| pr_in(&mut c, dev, prin_sa::READ_KEYS, 8192))?;
        expect_good(&r, &what("READ KEYS", i))?;
        let listed = prin::parse_read_keys(&r.data)
            .map_err(|_| what("short READ KEYS", i))?
            .1;
        check_eq!(listed, vec![k], "{}", what("keys through reservd", i));
        for p in &map.paths {
            check_eq!(
                device_keys(p)?,
                vec![k, k],
                "{}",
                what(&format!("keys on path {}", p.display()), i)
            );
        }
        let r = past_ua(|| {
            pr_out(
                &mut c,
                dev,
                prout_sa::RESERVE,
                pr_type::WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
                &keys(k, 0),
            )
        })?;
        expect_good(&r, &what("RESERVE", i))?;
        check_eq!(
            device_reservation(&map.paths[1])?.map(|(key, _)| key),
            Some(k),
            "{}",
            what("reservation on the second path", i)
        );
        let r = past_ua(|| {
            pr_out(
                &mut c,
                dev,
                prout_sa::RELEASE,
                pr_type::WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
                &keys(k, 0),
            )
        })?;
        expect_good(&r, &what("RELEASE", i))?;
        check_eq!(
            device_reservation(&map.paths[0])?,
            None,
            "{}",
            what("reservation after RELEASE", i)
        );
    }
    let r = past_ua(|| {
        pr_out(
            &mut c,
            dev,
            prout_sa::REGISTER,
            0,
            &keys(base + ROUNDS - 1, 0),
        )
    })?;
    expect_good(&r, &format!("{}: unregister", dev.display()))?;
    for p in &map.paths {
        check_eq!(
            device_keys(p)?,
            Vec::<u64>::new(),
            "{}: keys on {} after unregister",
            dev.display(),
            p.display()
        );
    }
    Ok(t.elapsed())
}

pub fn maps_two_maps_side_by_side() -> TestResult {
    let maps = maps()?;
    let d = Arc::new(reservd("reservd-two-maps", &["-v"])?);
    {
        let mut c = d.client()?;
        for m in &maps[..2] {
            reset_lun(&mut c, &m.dev)?;
        }
    }
    let start = Arc::new(Barrier::new(2));
    let t = Instant::now();
    let results: Vec<Result<Duration, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = maps[..2]
            .iter()
            .zip([0x0a0a_0000_0000_0001u64, 0x0b0b_0000_0000_0001])
            .map(|(m, base)| {
                let (d, start) = (Arc::clone(&d), Arc::clone(&start));
                s.spawn(move || rounds(&d, m, base, &start))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into())))
            .collect()
    });
    let wall = t.elapsed();
    let mut took = Vec::new();
    for r in results {
        took.push(r?);
    }
    println!(
        "  two maps, {ROUNDS} rounds each (REGISTER AND IGNORE, READ KEYS, RESERVE, RELEASE), side \
         by side: {:.1} s and {:.1} s, {:.1} s in all",
        took[0].as_secs_f64(),
        took[1].as_secs_f64(),
        wall.as_secs_f64()
    );
    Ok(())
}
