//! `vmm torture`: hundreds of crashes, some inside write-outs, never a committed write-out
//! lost and `kv` always verified after the restore.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn two_hundred_crashes_lose_nothing_committed() {
    let scratch = Scratch::new();
    let image = scratch.image().display().to_string();
    let out =
        run(&mut vmm(&["torture", "--nvram", &image, "--crashes", "200", "--seed", "12345"]), Duration::from_secs(600));
    assert_eq!(out.code(), Some(0), "{out:?}");
    let row = out.stdout.lines().last().unwrap_or_default();
    let cells: Vec<&str> = row.split('|').map(str::trim).filter(|c| !c.is_empty()).collect();
    assert_eq!(cells[0], "200", "{out:?}");
    assert!(cells[1].parse::<u64>().unwrap() > 20, "a fair share of the crashes hit write-outs: {out:?}");
    assert_eq!(cells[2], "199", "every boot after the first restored: {out:?}");
    assert_eq!(cells[3], "0", "{out:?}");
}
