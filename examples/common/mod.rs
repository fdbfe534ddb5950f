//! What the alternating benchmark examples share: the median, and the table of per-layer
//! medians and images/s they print.

/// The median of `v` (the upper one of an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One column per setting: each layer's median time over that setting's profiles
/// (`profiles[setting][run] = [(layer, ms)]`), then its median images/s window.
pub fn print_table(
    first: &str,
    labels: &[String],
    profiles: &[Vec<Vec<(String, f64)>>],
    rates: Vec<Vec<f64>>,
) {
    print!("| {first} |");
    for label in labels {
        print!(" {label} |");
    }
    println!("\n|---|{}", "---|".repeat(labels.len()));
    for i in 0..profiles[0][0].len() {
        print!("| {} |", profiles[0][0][i].0);
        for p in profiles {
            print!(" {:.3} |", median(p.iter().map(|p| p[i].1).collect()));
        }
        println!();
    }
    print!("| **images/s** (median window) |");
    for r in rates {
        print!(" **{:.1}** |", median(r));
    }
    println!();
}
