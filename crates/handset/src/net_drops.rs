//! Frames the network policy refused, in the audit log: every interval the daemon takes
//! from each running profile's VMM the refusals it tallied per rule (device request
//! `{"op":"take_drops"}` on `net0`) and records one `network-drop` audit record per rule that
//! refused something (at most [`MAX_RECORDS`] per profile and interval, the rest summed in
//! one), and one `network-drops` lifecycle event with the interval's total. Never a record
//! per frame: a guest flooding refused traffic costs the log a few lines per interval.

use std::time::Duration;

use serde::Deserialize;

/// How often refusals are taken when the daemon is not told otherwise.
pub const DEFAULT_EVERY: Duration = Duration::from_secs(60);
/// Audit records per profile and interval at most; the rules beyond share one.
pub const MAX_RECORDS: usize = 8;
/// Tallies read from one answer at most (the VMM keeps fewer; more is a broken VMM).
const MAX_TALLIES: usize = 20_000;
/// Characters kept of a rule label or frame description from the VMM.
const MAX_TEXT: usize = 200;

/// Frames one rule refused in the interval, as the VMM answers them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Tally {
    /// `rule 2 (deny udp ports 5000-6000)`, `default (deny)`; `, replaced` or `, removed`
    /// for a rule of a policy no longer in force.
    pub rule: String,
    /// Frames from the guest.
    pub out: u64,
    /// Frames to the guest.
    #[serde(rename = "in")]
    pub inn: u64,
    /// The last one, described.
    pub last: String,
}

#[derive(Deserialize)]
struct Answer {
    drops: Vec<Tally>,
}

/// The tallies of a `take_drops` answer, checked: the VMM runs next to a hostile guest, so
/// its answer is bounded and its text cleaned before it reaches the log.
pub fn parse_answer(answer: &str) -> Result<Vec<Tally>, String> {
    let a: Answer =
        serde_json::from_str(answer).map_err(|e| format!("bad take_drops answer: {e}"))?;
    if a.drops.len() > MAX_TALLIES {
        return Err(format!("{} tallies in one answer", a.drops.len()));
    }
    Ok(a.drops
        .into_iter()
        .filter(|t| t.out > 0 || t.inn > 0)
        .map(|t| Tally {
            rule: clean(&t.rule),
            last: clean(&t.last),
            ..t
        })
        .collect())
}

/// `s` without control characters, at most [`MAX_TEXT`] characters.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(MAX_TEXT)
        .collect()
}

/// The audit details for one interval of `every`: one per rule, most refusals first, at
/// most [`MAX_RECORDS`] (the last then sums the rest); and the event's summary. None when
/// nothing was refused.
pub fn records(tallies: &[Tally], every: Duration) -> Option<(Vec<String>, String)> {
    let mut sorted: Vec<&Tally> = tallies.iter().filter(|t| t.out > 0 || t.inn > 0).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by_key(|t| std::cmp::Reverse(t.out.saturating_add(t.inn)));
    let secs = every.as_secs().max(1);
    let line = |t: &Tally| {
        format!(
            "{}: {} frames refused in {secs} s ({} from the guest, {} to it); last: {}",
            t.rule,
            t.out.saturating_add(t.inn),
            t.out,
            t.inn,
            t.last
        )
    };
    let mut lines: Vec<String> = sorted.iter().take(MAX_RECORDS).map(|t| line(t)).collect();
    if sorted.len() > MAX_RECORDS {
        lines.pop();
        let rest = &sorted[MAX_RECORDS - 1..];
        let (out, inn) = rest.iter().fold((0u64, 0u64), |(o, i), t| {
            (o.saturating_add(t.out), i.saturating_add(t.inn))
        });
        lines.push(format!(
            "{} other rules: {} frames refused in {secs} s ({out} from the guest, {inn} to it)",
            rest.len(),
            out.saturating_add(inn)
        ));
    }
    let (out, inn) = sorted.iter().fold((0u64, 0u64), |(o, i), t| {
        (o.saturating_add(t.out), i.saturating_add(t.inn))
    });
    let summary = format!(
        "the network policy refused {} frames in {secs} s ({out} from the guest, {inn} to it) \
         by {} rules: see `pocketvisor profile audit`",
        out.saturating_add(inn),
        sorted.len()
    );
    Some((lines, summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(rule: &str, out: u64, inn: u64) -> Tally {
        Tally {
            rule: rule.into(),
            out,
            inn,
            last: format!("out tcp 10.0.0.2:1 -> {rule}"),
        }
    }

    #[test]
    fn one_record_per_rule_most_refusals_first_and_the_tail_summed() {
        assert_eq!(records(&[], Duration::from_secs(60)), None);
        let few = [
            tally("rule 1 (deny any)", 3, 0),
            tally("default (deny)", 10, 5),
        ];
        let (lines, summary) = records(&few, Duration::from_secs(60)).unwrap();
        assert_eq!(
            lines,
            [
                "default (deny): 15 frames refused in 60 s (10 from the guest, 5 to it); last: \
                 out tcp 10.0.0.2:1 -> default (deny)",
                "rule 1 (deny any): 3 frames refused in 60 s (3 from the guest, 0 to it); last: \
                 out tcp 10.0.0.2:1 -> rule 1 (deny any)",
            ]
        );
        assert!(summary.starts_with("the network policy refused 18 frames in 60 s (13 from the guest, 5 to it) by 2 rules"), "{summary}");
        // 20 rules refusing: MAX_RECORDS lines, the last summing the 13 smallest.
        let many: Vec<Tally> = (1..=20u64)
            .map(|i| tally(&format!("rule {i}"), i, 0))
            .collect();
        let (lines, _) = records(&many, Duration::from_secs(10)).unwrap();
        assert_eq!(lines.len(), MAX_RECORDS);
        assert!(lines[0].starts_with("rule 20: 20 frames"), "{}", lines[0]);
        let rest: u64 = (1..=13).sum();
        assert_eq!(
            lines[MAX_RECORDS - 1],
            format!(
                "13 other rules: {rest} frames refused in 10 s ({rest} from the guest, 0 to it)"
            )
        );
    }

    #[test]
    fn answers_are_bounded_and_cleaned() {
        let t = parse_answer(
            r#"{"drops":[{"rule":"rule 1\n(x)","out":2,"in":0,"last":"a\u001b[2Jb"},
                         {"rule":"r","out":0,"in":0,"last":""}]}"#,
        )
        .unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].rule, "rule 1?(x)");
        assert_eq!(t[0].last, "a?[2Jb");
        let long = "x".repeat(10_000);
        let t = parse_answer(&format!(
            r#"{{"drops":[{{"rule":"{long}","out":1,"in":0,"last":""}}]}}"#
        ))
        .unwrap();
        assert_eq!(t[0].rule.len(), MAX_TEXT);
        assert!(parse_answer(r#"{"drops":[{"rule":"r","out":-1,"in":0,"last":""}]}"#).is_err());
        assert!(parse_answer("[]").is_err());
    }
}
