//! Snapshot tests: a few rendered screens against PNGs in `fixtures/sim/`, so that any change
//! to rendering is seen in review. The fixtures were looked at by a person when they were
//! made; regenerate them with `SIM_UPDATE_SNAPSHOTS=1 cargo test -p arpo-env-sim --test snapshots`
//! after an intended change, and look at them again.

use std::path::PathBuf;

use arpo_env_sim::{Catalogue, Session};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/sim")
        .join(name)
}

/// Renders `task` after the first `steps` oracle actions.
fn screen(id: &str, steps: usize, size: (u32, u32)) -> (Vec<u8>, u32, u32) {
    let c = Catalogue::default();
    let task = c.task(id).expect("known task");
    let mut s = Session::from_task(&task, size.0, size.1).expect("session");
    let oracle = s.oracle().expect("oracle");
    for a in oracle.iter().take(steps) {
        s.apply_action(a).expect("valid");
    }
    let rgb = s.render_rgb().expect("render").to_vec();
    (rgb, size.0, size.1)
}

fn check(name: &str, id: &str, steps: usize, size: (u32, u32)) {
    let (rgb, w, h) = screen(id, steps, size);
    let path = fixture(name);
    if std::env::var_os("SIM_UPDATE_SNAPSHOTS").is_some() {
        let png = arpo_env_sim::render::encode_png(&rgb, w, h).expect("encode");
        std::fs::write(&path, png).expect("write fixture");
        return;
    }
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let img = image::load_from_memory(&bytes)
        .expect("fixture decodes")
        .to_rgb8();
    assert_eq!((img.width(), img.height()), (w, h), "{name}: size");
    let differing = img
        .as_raw()
        .chunks_exact(3)
        .zip(rgb.chunks_exact(3))
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(
        differing, 0,
        "{name}: {differing} pixels differ from the snapshot"
    );
}

#[test]
fn form_half_filled() {
    check("form.png", "sim-fill_form-train-000", 4, (336, 224));
}

#[test]
fn menu_open() {
    check("menu_open.png", "sim-menu-train-001", 1, (336, 224));
}

#[test]
fn dialog_with_dropdown_open() {
    check("dialog.png", "sim-dialog-heldout-000", 3, (336, 224));
}

#[test]
fn desktop_icons_with_context_menu() {
    check(
        "context_menu.png",
        "sim-context_delete-train-002",
        1,
        (336, 224),
    );
}

#[test]
fn scrolled_list() {
    check("list.png", "sim-scroll_list-train-003", 1, (336, 224));
}

#[test]
fn colour_buttons() {
    check(
        "colour_buttons.png",
        "sim-colour_button-heldout-001",
        0,
        (336, 224),
    );
}
