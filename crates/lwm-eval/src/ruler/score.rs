//! RULER's scoring (`scripts/eval/evaluate.py` and `eval/synthetic/constants.py`).

use super::tasks::Metric;

/// `postprocess_pred`: strip, turn control characters into newlines, strip again.
pub fn postprocess(pred: &str) -> String {
    pred.trim()
        .chars()
        .map(|c| if (c as u32) < 0x20 { '\n' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

/// One prediction's score in percent: `string_match_all` (the share of references that
/// appear in the prediction, case-insensitively) or `string_match_part` (100 when any
/// does). RULER averages these over a task's samples and rounds to 2 decimals.
pub fn score(metric: Metric, pred: &str, refs: &[String]) -> f64 {
    if refs.is_empty() {
        return 0.0;
    }
    let p = postprocess(pred).to_lowercase();
    let found = |r: &String| p.contains(&r.to_lowercase());
    match metric {
        Metric::MatchAll => {
            100.0 * refs.iter().filter(|r| found(r)).count() as f64 / refs.len() as f64
        }
        Metric::MatchPart => {
            if refs.iter().any(found) {
                100.0
            } else {
                0.0
            }
        }
    }
}

/// Python's `round(x, 2)` for the figures RULER prints.
pub fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn match_all_and_part_follow_ruler() {
        // string_match_all: 2 of 4 references present (case-insensitive) -> 50.
        let refs = s(&["1234567", "Alpha-Beta", "9", "zzz"]);
        assert_eq!(
            score(Metric::MatchAll, " 1234567 and alpha-beta, 9", &refs),
            75.0
        );
        assert_eq!(score(Metric::MatchAll, "nothing", &refs), 0.0);
        assert_eq!(score(Metric::MatchPart, "it is ZZZ", &refs), 100.0);
        assert_eq!(score(Metric::MatchPart, "no", &refs), 0.0);
    }

    #[test]
    fn postprocess_strips_and_maps_control_characters() {
        assert_eq!(postprocess("  a\tb\u{1}c \n"), "a\nb\nc");
    }
}
