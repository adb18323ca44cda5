//! Printing unix times as UTC dates, for the CLI's listings (no time-zone database needed).

/// `YYYY-MM-DD HH:MM:SS` (UTC) for seconds since the epoch, proleptic Gregorian (civil date
/// from days since 1970-01-01, in eras of 400 March-based years).
pub fn utc_seconds(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::utc_seconds;

    #[test]
    fn seconds_print_as_civil_dates_before_and_after_the_epoch() {
        assert_eq!(utc_seconds(0), "1970-01-01 00:00:00");
        assert_eq!(utc_seconds(951_782_400 + 3661), "2000-02-29 01:01:01");
        assert_eq!(utc_seconds(-1), "1969-12-31 23:59:59");
    }
}
