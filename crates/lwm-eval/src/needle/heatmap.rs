//! The length x depth heatmap as a PNG: plotters draws into an RGB buffer with a bundled
//! font (no system fonts needed), `png` encodes it.

use super::report::Summary;
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

const WIDTH: u32 = 1000;
const HEIGHT: u32 = 640;

/// Accuracy colour: red (0) through yellow (0.5) to green (1).
pub fn accuracy_color(a: f64) -> RGBColor {
    let a = a.clamp(0.0, 1.0);
    let (lo, hi, t) = if a < 0.5 {
        ((215.0, 48.0, 39.0), (254.0, 224.0, 139.0), a / 0.5)
    } else {
        ((254.0, 224.0, 139.0), (26.0, 152.0, 80.0), (a - 0.5) / 0.5)
    };
    let mix = |x: f64, y: f64| (x + (y - x) * t).round() as u8;
    RGBColor(mix(lo.0, hi.0), mix(lo.1, hi.1), mix(lo.2, hi.2))
}

/// Render the heatmap to RGB8 pixels (`WIDTH x HEIGHT`).
pub fn render(summary: &Summary, title: &str) -> Result<(Vec<u8>, u32, u32)> {
    crate::plot::register_font()?;
    let mut buf = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    draw(summary, title, &mut buf).map_err(|e| anyhow!("drawing the heatmap: {e}"))?;
    Ok((buf, WIDTH, HEIGHT))
}

fn draw(summary: &Summary, title: &str, buf: &mut [u8]) -> Result<(), Box<dyn std::error::Error>> {
    let lengths = &summary.context_lengths;
    let depths = &summary.depths;
    let (ncols, nrows) = (lengths.len() as i32, depths.len() as i32);
    let root = BitMapBackend::with_buffer(buf, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let (main, side) = root.split_horizontally(WIDTH - 130);
    let beyond = |l: usize| summary.trained_length.is_some_and(|t| l > t);
    // Unit cells in f64 coordinates; tick labels are drawn at the cell centres below.
    let mut chart = ChartBuilder::on(&main)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(55)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..ncols as f64, 0f64..nrows as f64)?;
    // Rows count up from the bottom and the last row is depth 0: the document start is on top.
    let depth_of_row = |r: i32| depths[(nrows - 1 - r) as usize];
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(0)
        .y_labels(0)
        .x_desc("Context length (tokens)")
        .y_desc("Needle depth (% of document)")
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    let tick = ("sans-serif", 14).into_font().color(&BLACK);
    for c in 0..ncols {
        let l = lengths[c as usize];
        let (px, py) = chart.backend_coord(&(c as f64 + 0.5, 0.0));
        root.draw(&Text::new(
            format!("{l}{}", if beyond(l) { "*" } else { "" }),
            (px, py + 8),
            tick.clone().pos(Pos::new(HPos::Center, VPos::Top)),
        ))?;
    }
    for r in 0..nrows {
        let (px, py) = chart.backend_coord(&(0.0, r as f64 + 0.5));
        root.draw(&Text::new(
            depth_of_row(r).to_string(),
            (px - 8, py),
            tick.clone().pos(Pos::new(HPos::Right, VPos::Center)),
        ))?;
    }
    let mut cells = Vec::new();
    for c in 0..ncols {
        for r in 0..nrows {
            let cell = summary.cell(lengths[c as usize], depth_of_row(r));
            cells.push((c, r, cell.map(|g| g.accuracy)));
        }
    }
    chart.draw_series(cells.iter().map(|&(c, r, acc)| {
        let color = acc.map_or(RGBColor(230, 230, 230), accuracy_color);
        let (x, y) = (c as f64, r as f64);
        Rectangle::new([(x, y), (x + 1.0, y + 1.0)], color.filled())
    }))?;
    // Thin white grid lines between cells.
    chart.draw_series(cells.iter().map(|&(c, r, _)| {
        let (x, y) = (c as f64, r as f64);
        Rectangle::new([(x, y), (x + 1.0, y + 1.0)], WHITE.stroke_width(1))
    }))?;
    let centered = Pos::new(HPos::Center, VPos::Center);
    let font_px = if nrows > 14 { 11 } else { 14 };
    chart.draw_series(cells.iter().filter_map(|&(c, r, acc)| {
        acc.map(|a| {
            Text::new(
                format!("{:.0}", a * 100.0),
                (c as f64 + 0.5, r as f64 + 0.5),
                ("sans-serif", font_px)
                    .into_font()
                    .color(&BLACK)
                    .pos(centered),
            )
        })
    }))?;
    // Colour bar.
    let (bar_x0, bar_x1, bar_y0, bar_y1) = (30, 55, 80, (HEIGHT - 120) as i32);
    let steps = 100;
    for i in 0..steps {
        let a = 1.0 - i as f64 / (steps - 1) as f64;
        let y0 = bar_y0 + (bar_y1 - bar_y0) * i / steps;
        let y1 = bar_y0 + (bar_y1 - bar_y0) * (i + 1) / steps;
        side.draw(&Rectangle::new(
            [(bar_x0, y0), (bar_x1, y1)],
            accuracy_color(a).filled(),
        ))?;
    }
    let label = ("sans-serif", 13).into_font().color(&BLACK);
    for (a, txt) in [(1.0, "100%"), (0.5, "50%"), (0.0, "0%")] {
        let y = bar_y0 + ((bar_y1 - bar_y0) as f64 * (1.0 - a)) as i32;
        side.draw(&Text::new(
            txt,
            (bar_x1 + 6, y),
            label.clone().pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
    }
    side.draw(&Text::new(
        "accuracy",
        (bar_x0 - 4, bar_y0 - 22),
        label.clone(),
    ))?;
    if let Some(t) = summary.trained_length {
        if lengths.iter().any(|&l| l > t) {
            main.draw(&Text::new(
                format!("* beyond the trained context ({t} tokens)"),
                (80, HEIGHT as i32 - 16),
                ("sans-serif", 12).into_font().color(&BLACK),
            ))?;
        }
    }
    root.present()?;
    Ok(())
}

/// Write the heatmap PNG.
pub fn write_png(summary: &Summary, title: &str, path: &Path) -> Result<()> {
    let (pixels, w, h) = render(summary, title)?;
    crate::plot::write_rgb_png(path, &pixels, w, h)
}
