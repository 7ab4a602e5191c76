//! Drawing the desktop into an RGB buffer, and PNG encoding.

use crate::desktop::{
    Desktop, ICON_H, ICON_W, IconKind, LOGICAL_H, LOGICAL_W, MENU_H, POPUP_W, ROW_H, Rect, TITLE_H,
    Widget, WidgetKind, Window, slider_x_of,
};
use crate::{SimError, font};

type Rgb = [u8; 3];

const DESKTOP_BG: Rgb = [58, 110, 165];
const WINDOW_BG: Rgb = [232, 232, 232];
const BORDER: Rgb = [50, 50, 60];
const TITLE_ACTIVE: Rgb = [30, 70, 150];
const TITLE_INACTIVE: Rgb = [120, 124, 136];
const WHITE: Rgb = [255, 255, 255];
const BLACK: Rgb = [0, 0, 0];
const TEXT: Rgb = [20, 20, 20];
const MUTED: Rgb = [110, 110, 110];
const HILITE: Rgb = [50, 100, 200];
const FOCUS: Rgb = [255, 150, 0];
const FACE: Rgb = [205, 205, 210];

/// The smallest supported screen.
pub const MIN_SIZE: (u32, u32) = (LOGICAL_W as u32, LOGICAL_H as u32);

/// The integer scale for a screen size: how many screen pixels one logical pixel covers.
pub fn scale_for(width: u32, height: u32) -> Result<u32, SimError> {
    let s = (width / LOGICAL_W as u32).min(height / LOGICAL_H as u32);
    if s == 0 {
        return Err(SimError::ScreenSize {
            width,
            height,
            min_width: MIN_SIZE.0,
            min_height: MIN_SIZE.1,
        });
    }
    Ok(s)
}

/// An RGB frame being drawn, addressed in logical pixels.
struct Canvas<'a> {
    buf: &'a mut [u8],
    w: i32,
    h: i32,
    s: i32,
}

impl Canvas<'_> {
    /// Fills screen pixels [x0, x1) x [y0, y1), clipped.
    fn fill_px(&mut self, x0: i32, y0: i32, x1: i32, y1: i32, c: Rgb) {
        let (x0, x1) = (x0.max(0), x1.min(self.w));
        let (y0, y1) = (y0.max(0), y1.min(self.h));
        if x0 >= x1 || y0 >= y1 {
            return;
        }
        for y in y0..y1 {
            let row = (y * self.w) as usize * 3;
            let seg = &mut self.buf[row + x0 as usize * 3..row + x1 as usize * 3];
            for px in seg.chunks_exact_mut(3) {
                px.copy_from_slice(&c);
            }
        }
    }

    fn fill(&mut self, r: Rect, c: Rgb) {
        let s = self.s;
        self.fill_px(r.x * s, r.y * s, (r.x + r.w) * s, (r.y + r.h) * s, c);
    }

    fn frame(&mut self, r: Rect, c: Rgb) {
        self.fill(Rect::new(r.x, r.y, r.w, 1), c);
        self.fill(Rect::new(r.x, r.y + r.h - 1, r.w, 1), c);
        self.fill(Rect::new(r.x, r.y, 1, r.h), c);
        self.fill(Rect::new(r.x + r.w - 1, r.y, 1, r.h), c);
    }

    /// Draws text with its glyphs' top-left at (x, y), cut to `max_w` logical pixels.
    fn text(&mut self, x: i32, y: i32, text: &str, c: Rgb, max_w: i32) {
        let s = self.s;
        let mut cx = x;
        for ch in text.chars() {
            if cx + font::GLYPH_W > x + max_w {
                break;
            }
            let g = font::glyph(ch);
            for (row, bits) in g.iter().enumerate() {
                if *bits == 0 {
                    continue;
                }
                for col in 0..font::GLYPH_W {
                    if bits & (0x10 >> col) != 0 {
                        let px = (cx + col) * s;
                        let py = (y + row as i32) * s;
                        self.fill_px(px, py, px + s, py + s, c);
                    }
                }
            }
            cx += font::ADVANCE;
        }
    }

    fn text_centered(&mut self, r: Rect, text: &str, c: Rgb) {
        let tw = font::text_width(text).min(r.w - 2);
        let x = r.x + (r.w - tw) / 2;
        let y = r.y + (r.h - font::GLYPH_H) / 2;
        self.text(x, y, text, c, r.w - 2);
    }
}

/// Renders the desktop into `buf` (RGB, `width * height * 3` bytes, resized as needed).
pub fn render_into(
    desktop: &Desktop,
    width: u32,
    height: u32,
    buf: &mut Vec<u8>,
) -> Result<(), SimError> {
    let s = scale_for(width, height)? as i32;
    buf.resize(width as usize * height as usize * 3, 0);
    let mut c = Canvas {
        buf,
        w: width as i32,
        h: height as i32,
        s,
    };
    c.fill_px(0, 0, c.w, c.h, DESKTOP_BG);
    for icon in &desktop.icons {
        draw_icon(&mut c, desktop, icon);
    }
    let n = desktop.windows.len();
    for (i, w) in desktop.windows.iter().enumerate() {
        draw_window(&mut c, desktop, w, i + 1 == n);
    }
    // Popups go over every window.
    for w in &desktop.windows {
        draw_popups(&mut c, w);
    }
    if let Some(cm) = &desktop.context_menu {
        let all = Rect::new(cm.x, cm.y, POPUP_W, cm.items.len() as i32 * ROW_H);
        c.fill(all, WHITE);
        for (j, item) in cm.items.iter().enumerate() {
            let r = cm.item_rect(j);
            c.text(r.x + 4, r.y + 1, item, TEXT, r.w - 6);
        }
        c.frame(all, BORDER);
    }
    draw_cursor(&mut c, desktop.pointer);
    Ok(())
}

/// Renders the desktop to a fresh RGB buffer.
pub fn render(desktop: &Desktop, width: u32, height: u32) -> Result<Vec<u8>, SimError> {
    let mut buf = Vec::new();
    render_into(desktop, width, height, &mut buf)?;
    Ok(buf)
}

/// Encodes an RGB buffer as PNG with fast settings.
pub fn encode_png(rgb: &[u8], width: u32, height: u32) -> Result<Vec<u8>, SimError> {
    use image::ImageEncoder as _;
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let mut out = Vec::with_capacity(rgb.len() / 8);
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::Sub)
        .write_image(rgb, width, height, image::ExtendedColorType::Rgb8)
        .map_err(|e| SimError::Encode(e.to_string()))?;
    Ok(out)
}

fn draw_icon(c: &mut Canvas<'_>, d: &Desktop, icon: &crate::desktop::Icon) {
    let col = icon.colour.rgb();
    let bx = icon.x + (ICON_W - 18) / 2;
    let by = icon.y + 1;
    match &icon.kind {
        IconKind::App { .. } => {
            c.fill(Rect::new(bx, by, 18, 15), col);
            c.frame(Rect::new(bx, by, 18, 15), BORDER);
            c.fill(Rect::new(bx + 3, by + 3, 12, 2), WHITE);
        }
        IconKind::File => {
            c.fill(Rect::new(bx + 3, by, 12, 16), WHITE);
            c.frame(Rect::new(bx + 3, by, 12, 16), BORDER);
            c.fill(Rect::new(bx + 5, by + 3, 8, 4), col);
            c.fill(Rect::new(bx + 5, by + 9, 8, 1), MUTED);
            c.fill(Rect::new(bx + 5, by + 11, 8, 1), MUTED);
        }
        IconKind::Folder { contents } => {
            c.fill(Rect::new(bx, by + 1, 8, 3), col);
            c.fill(Rect::new(bx, by + 3, 18, 12), col);
            c.frame(Rect::new(bx, by + 3, 18, 12), BORDER);
            if !contents.is_empty() {
                c.fill(Rect::new(bx + 3, by + 6, 12, 2), WHITE);
            }
        }
    }
    let selected = d.selected_icon.as_deref() == Some(icon.id.as_str());
    let tw = font::text_width(&icon.label).min(ICON_W);
    let lx = icon.x + (ICON_W - tw) / 2;
    let ly = icon.y + ICON_H - font::GLYPH_H - 2;
    if selected {
        c.fill(Rect::new(lx - 1, ly - 1, tw + 2, font::GLYPH_H + 2), HILITE);
    }
    c.text(lx, ly, &icon.label, WHITE, ICON_W);
}

fn draw_window(c: &mut Canvas<'_>, d: &Desktop, w: &Window, active: bool) {
    let r = w.rect;
    c.fill(r, WINDOW_BG);
    let title = w.title_rect();
    c.fill(title, if active { TITLE_ACTIVE } else { TITLE_INACTIVE });
    c.text(
        title.x + 3,
        title.y + 2,
        &w.title,
        WHITE,
        title.w - TITLE_H - 5,
    );
    let close = w.close_rect();
    c.fill(close, [200, 60, 60]);
    c.text_centered(close, "x", WHITE);
    if !w.menus.is_empty() {
        c.fill(Rect::new(r.x, r.y + TITLE_H, r.w, MENU_H), [248, 248, 248]);
        for (mi, m) in w.menus.iter().enumerate() {
            let t = w.menu_title_rect(mi);
            if w.open_menu == Some(mi) {
                c.fill(t, [200, 215, 240]);
            }
            c.text(t.x + 4, t.y + 1, &m.title, TEXT, t.w);
        }
        c.fill(
            Rect::new(r.x, r.y + TITLE_H + MENU_H - 1, r.w, 1),
            [190, 190, 190],
        );
    }
    for x in &w.widgets {
        draw_widget(c, d, w, x);
    }
    c.frame(r, BORDER);
}

fn draw_widget(c: &mut Canvas<'_>, d: &Desktop, w: &Window, x: &Widget) {
    let r = w.widget_rect(x);
    let focused = d.focus.as_deref() == Some(x.id.as_str());
    match &x.kind {
        WidgetKind::Label { text } => c.text(r.x, r.y + (r.h - font::GLYPH_H) / 2, text, TEXT, r.w),
        WidgetKind::Button {
            label,
            colour,
            presses,
            ..
        } => {
            let face = colour.map_or(FACE, |k| k.rgb());
            let ink = if colour.is_none_or(|k| k.is_light()) {
                TEXT
            } else {
                WHITE
            };
            c.fill(r, face);
            c.frame(r, BORDER);
            if *presses > 0 {
                // Pressed at least once: a sunken inner edge.
                c.fill(Rect::new(r.x + 1, r.y + 1, r.w - 2, 1), [60, 60, 60]);
                c.fill(Rect::new(r.x + 1, r.y + 1, 1, r.h - 2), [60, 60, 60]);
            }
            c.text_centered(r, label, ink);
        }
        WidgetKind::TextField {
            text,
            caret,
            all_selected,
            ..
        } => {
            c.fill(r, WHITE);
            c.frame(r, BORDER);
            let ty = r.y + (r.h - font::GLYPH_H) / 2;
            if *all_selected && !text.is_empty() {
                c.fill(
                    Rect::new(
                        r.x + 2,
                        ty - 1,
                        font::text_width(text).min(r.w - 4) + 1,
                        font::GLYPH_H + 2,
                    ),
                    HILITE,
                );
                c.text(r.x + 2, ty, text, WHITE, r.w - 4);
            } else {
                c.text(r.x + 2, ty, text, TEXT, r.w - 4);
            }
            if focused {
                let cx = (r.x + 2 + *caret as i32 * font::ADVANCE - 1).min(r.x + r.w - 2);
                c.fill(Rect::new(cx, ty - 1, 1, font::GLYPH_H + 2), BLACK);
            }
        }
        WidgetKind::Checkbox { label, checked } => {
            let b = Rect::new(r.x, r.y + (r.h - 8) / 2, 8, 8);
            c.fill(b, WHITE);
            c.frame(b, BORDER);
            if *checked {
                c.fill(Rect::new(b.x + 2, b.y + 2, 4, 4), BLACK);
            }
            c.text(
                r.x + 11,
                r.y + (r.h - font::GLYPH_H) / 2,
                label,
                TEXT,
                r.w - 11,
            );
        }
        WidgetKind::Radio { options, selected } => {
            for (i, o) in options.iter().enumerate() {
                let row = Rect::new(r.x, r.y + i as i32 * ROW_H, r.w, ROW_H);
                let b = Rect::new(row.x + 1, row.y + 1, 7, 7);
                c.fill(b, WHITE);
                c.fill(Rect::new(b.x, b.y + 1, 1, 5), BORDER);
                c.fill(Rect::new(b.x + 6, b.y + 1, 1, 5), BORDER);
                c.fill(Rect::new(b.x + 1, b.y, 5, 1), BORDER);
                c.fill(Rect::new(b.x + 1, b.y + 6, 5, 1), BORDER);
                if *selected == Some(i) {
                    c.fill(Rect::new(b.x + 2, b.y + 2, 3, 3), BLACK);
                }
                c.text(row.x + 11, row.y + 1, o, TEXT, row.w - 11);
            }
        }
        WidgetKind::Dropdown {
            options, selected, ..
        } => {
            c.fill(r, WHITE);
            c.frame(r, BORDER);
            let shown = selected
                .and_then(|s| options.get(s))
                .map_or("", |s| s.as_str());
            c.text(
                r.x + 2,
                r.y + (r.h - font::GLYPH_H) / 2,
                shown,
                TEXT,
                r.w - 12,
            );
            let a = Rect::new(r.x + r.w - 9, r.y + 1, 8, r.h - 2);
            c.fill(a, FACE);
            c.fill(Rect::new(a.x + 1, a.y + 3, 5, 1), BLACK);
            c.fill(Rect::new(a.x + 2, a.y + 4, 3, 1), BLACK);
            c.fill(Rect::new(a.x + 3, a.y + 5, 1, 1), BLACK);
        }
        WidgetKind::List {
            items,
            top,
            selected,
            opened,
        } => {
            c.fill(r, WHITE);
            let rows = x.visible_rows();
            for (k, i) in (*top..items.len()).take(rows).enumerate() {
                let row = Rect::new(r.x + 1, r.y + k as i32 * ROW_H, r.w - 6, ROW_H);
                let ink = if *selected == Some(i) {
                    c.fill(row, HILITE);
                    WHITE
                } else {
                    TEXT
                };
                let mark = if *opened == Some(i) { "> " } else { "" };
                c.text(
                    row.x + 2,
                    row.y + 1,
                    &format!("{mark}{}", items[i]),
                    ink,
                    row.w - 3,
                );
            }
            // Scroll bar.
            let bar = Rect::new(r.x + r.w - 5, r.y, 5, r.h);
            c.fill(bar, [215, 215, 215]);
            if items.len() > rows {
                let th = (r.h * rows as i32 / items.len() as i32).max(4);
                let max_top = (items.len() - rows) as i32;
                let ty = r.y + (r.h - th) * *top as i32 / max_top.max(1);
                c.fill(Rect::new(bar.x + 1, ty, 3, th), [110, 110, 120]);
            }
            c.frame(r, BORDER);
        }
        WidgetKind::Slider { min, max, value } => {
            let mid = r.y + r.h / 2;
            c.fill(Rect::new(r.x + 3, mid - 1, r.w - 6, 2), [90, 90, 90]);
            let kx = slider_x_of(r, *min, *max, *value);
            c.fill(Rect::new(kx - 2, r.y, 5, r.h), HILITE);
            c.frame(Rect::new(kx - 2, r.y, 5, r.h), BORDER);
            let v = value.to_string();
            c.text(r.x + r.w + 3, r.y + (r.h - font::GLYPH_H) / 2, &v, TEXT, 30);
        }
    }
    if focused {
        c.frame(Rect::new(r.x - 1, r.y - 1, r.w + 2, r.h + 2), FOCUS);
    }
}

fn draw_popups(c: &mut Canvas<'_>, w: &Window) {
    if let Some(mi) = w.open_menu
        && let Some(menu) = w.menus.get(mi)
    {
        let first = w.menu_item_rect(mi, 0);
        let all = Rect::new(first.x, first.y, first.w, menu.items.len() as i32 * ROW_H);
        c.fill(all, WHITE);
        for (j, item) in menu.items.iter().enumerate() {
            let r = w.menu_item_rect(mi, j);
            c.text(r.x + 4, r.y + 1, &item.label, TEXT, POPUP_W - 6);
            if let Some(s) = &item.shortcut {
                let sw = font::text_width(s);
                c.text(r.x + r.w - sw - 3, r.y + 1, s, MUTED, sw + 1);
            }
        }
        c.frame(all, BORDER);
    }
    for x in &w.widgets {
        if let WidgetKind::Dropdown {
            options,
            selected,
            open: true,
        } = &x.kind
        {
            let r = w.widget_rect(x);
            let all = Rect::new(r.x, r.y + r.h, r.w, options.len() as i32 * ROW_H);
            c.fill(all, WHITE);
            for (j, o) in options.iter().enumerate() {
                let row = Rect::new(r.x, r.y + r.h + j as i32 * ROW_H, r.w, ROW_H);
                let ink = if *selected == Some(j) {
                    c.fill(row, HILITE);
                    WHITE
                } else {
                    TEXT
                };
                c.text(row.x + 2, row.y + 1, o, ink, row.w - 3);
            }
            c.frame(all, BORDER);
        }
    }
}

/// An arrow pointer, 1 = outline, 2 = fill.
#[rustfmt::skip]
const CURSOR: [[u8; 8]; 12] = [
    [1, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 0, 0, 0, 0, 0, 0],
    [1, 2, 1, 0, 0, 0, 0, 0],
    [1, 2, 2, 1, 0, 0, 0, 0],
    [1, 2, 2, 2, 1, 0, 0, 0],
    [1, 2, 2, 2, 2, 1, 0, 0],
    [1, 2, 2, 2, 2, 2, 1, 0],
    [1, 2, 2, 2, 2, 2, 2, 1],
    [1, 2, 2, 1, 1, 1, 1, 1],
    [1, 2, 1, 0, 1, 2, 1, 0],
    [1, 1, 0, 0, 1, 2, 1, 0],
    [0, 0, 0, 0, 0, 1, 1, 0],
];

fn draw_cursor(c: &mut Canvas<'_>, (px, py): (i32, i32)) {
    for (row, line) in CURSOR.iter().enumerate() {
        for (col, v) in line.iter().enumerate() {
            let colour = match v {
                1 => BLACK,
                2 => WHITE,
                _ => continue,
            };
            c.fill(Rect::new(px + col as i32, py + row as i32, 1, 1), colour);
        }
    }
}
