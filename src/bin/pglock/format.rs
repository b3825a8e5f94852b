//! Parsing and printing of the values the command line deals in: keys, durations, signals,
//! timestamps.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pglock::AdvisoryKey;

/// Parses `--key`: one `bigint` (`42`, `-7`) or a pair of `integer`s (`1,2`).
pub fn parse_key(text: &str) -> Result<AdvisoryKey, String> {
    let text = text.trim();
    if let Some((a, b)) = text.split_once(',') {
        let a = a.trim().parse::<i32>();
        let b = b.trim().parse::<i32>();
        match (a, b) {
            (Ok(a), Ok(b)) => Ok(AdvisoryKey::Pair(a, b)),
            _ => Err(format!(
                "`{text}` is not a key pair: expected two 32-bit integers such as `1,2`"
            )),
        }
    } else {
        text.parse::<i64>().map(AdvisoryKey::Single).map_err(|_| {
            format!("`{text}` is not a key: expected a 64-bit integer such as `42`, or a pair such as `1,2`")
        })
    }
}

/// A key as `--key` accepts it: `42` or `1,2`.
pub fn key_arg(key: AdvisoryKey) -> String {
    match key {
        AdvisoryKey::Single(k) => k.to_string(),
        AdvisoryKey::Pair(a, b) => format!("{a},{b}"),
    }
}

/// Parses a duration: a number of seconds (`10`, `0.5`) or a number with a unit (`250ms`,
/// `10s`, `2m`, `1h`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || {
        format!("`{text}` is not a duration: use seconds (`10`, `0.5`) or a unit (`250ms`, `10s`, `2m`, `1h`)")
    };
    let value: f64 = number.parse().map_err(|_| bad())?;
    let scale = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ms" => 0.001,
        "m" | "min" | "mins" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad()),
    };
    let seconds = value * scale;
    if !seconds.is_finite() || !(0.0..=1e9).contains(&seconds) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Parses a signal by name (`TERM`, `SIGTERM`, `term`) or number (`15`).
pub fn parse_signal(text: &str) -> Result<i32, String> {
    let upper = text.trim().to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Ok(number) = name.parse::<i32>() {
        if (1..=64).contains(&number) {
            return Ok(number);
        }
    }
    SIGNALS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, number)| *number)
        .ok_or_else(|| format!("`{text}` is not a signal: use a name such as TERM, INT, HUP, QUIT, KILL, USR1, or a number"))
}

/// The name of signal `number`, as `SIGTERM`.
pub fn signal_name(number: i32) -> String {
    SIGNALS
        .iter()
        .find(|(_, n)| *n == number)
        .map(|(name, _)| format!("SIG{name}"))
        .unwrap_or_else(|| format!("signal {number}"))
}

const SIGNALS: &[(&str, i32)] = &[
    ("HUP", libc::SIGHUP),
    ("INT", libc::SIGINT),
    ("QUIT", libc::SIGQUIT),
    ("KILL", libc::SIGKILL),
    ("USR1", libc::SIGUSR1),
    ("USR2", libc::SIGUSR2),
    ("TERM", libc::SIGTERM),
    ("ALRM", libc::SIGALRM),
    ("CONT", libc::SIGCONT),
    ("STOP", libc::SIGSTOP),
    ("WINCH", libc::SIGWINCH),
];

/// A duration for people: `350ms`, `12s`, `4m 05s`, `2h 03m`.
pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        format!("{}ms", d.as_millis())
    } else if secs < 60 {
        format!("{secs}s")
    } else if secs < 3600 {
        format!("{}m {:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h {:02}m", secs / 3600, (secs % 3600) / 60)
    }
}

/// How long ago `t` was, for people (`0ms` if it is in the future: clocks differ).
pub fn ago(t: SystemTime, now: SystemTime) -> String {
    human_duration(now.duration_since(t).unwrap_or_default())
}

/// `t` as RFC 3339 in UTC, to the second (`2024-05-01T12:00:00Z`) or to the microsecond.
pub fn rfc3339(t: SystemTime, micros: bool) -> String {
    let (secs, sub) = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_micros()),
        Err(e) => {
            let d = e.duration();
            let mut secs = -(d.as_secs() as i64);
            let mut sub = d.subsec_micros();
            if sub > 0 {
                secs -= 1;
                sub = 1_000_000 - sub;
            }
            (secs, sub)
        }
    };
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    if micros {
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{sub:06}Z")
    } else {
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        assert_eq!(parse_key("42"), Ok(AdvisoryKey::Single(42)));
        assert_eq!(parse_key("-9"), Ok(AdvisoryKey::Single(-9)));
        assert_eq!(parse_key("1, 2"), Ok(AdvisoryKey::Pair(1, 2)));
        assert!(parse_key("1,2,3").is_err());
        assert!(parse_key("x").is_err());
        assert!(parse_key("4294967296,1").is_err());
        assert_eq!(key_arg(AdvisoryKey::Pair(-1, 2)), "-1,2");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5d").is_err());
        assert_eq!(human_duration(Duration::from_secs(65)), "1m 05s");
        assert_eq!(human_duration(Duration::from_millis(20)), "20ms");
    }

    #[test]
    fn signals() {
        assert_eq!(parse_signal("TERM"), Ok(libc::SIGTERM));
        assert_eq!(parse_signal("sigkill"), Ok(libc::SIGKILL));
        assert_eq!(parse_signal("2"), Ok(2));
        assert!(parse_signal("NOPE").is_err());
        assert_eq!(signal_name(libc::SIGTERM), "SIGTERM");
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(UNIX_EPOCH, false), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_micros(1_714_564_800_123_456);
        assert_eq!(rfc3339(t, true), "2024-05-01T12:00:00.123456Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400), false),
            "2000-02-29T00:00:00Z"
        );
    }
}
