//! Rounds, medians, ratios, the table and the JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use crate::cases::{Case, Env, Sample, CASES};

pub struct Config {
    pub rounds: usize,
    pub sample: Duration,
    pub json: Option<String>,
    pub only: Option<String>,
    pub threads: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            rounds: 7,
            sample: Duration::from_millis(300),
            json: None,
            only: None,
            threads: 1,
        }
    }
}

fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

pub async fn run(config: Config) {
    let env = Env::connect().await;
    let cases: Vec<&Case> = CASES
        .iter()
        .filter(|case| match &config.only {
            None => true,
            Some(only) => {
                case.id.contains(only.as_str())
                    || case.scenario.contains(only.as_str())
                    // Keep the baselines of the selected cases.
                    || CASES.iter().any(|c| {
                        (c.id.contains(only.as_str()) || c.scenario.contains(only.as_str()))
                            && c.baseline == Some(case.id)
                    })
            }
        })
        .collect();
    eprintln!(
        "pglock-bench: {} cases x {} rounds, {:?} per sample, {} runtime thread(s), against {}",
        cases.len(),
        config.rounds,
        config.sample,
        config.threads.max(1),
        pglock::redact_url(&env.url)
    );
    // Warm up every case once (connections, prepared statements, caches).
    for case in cases.iter().filter(|c| !c.once) {
        let _ = (case.run)(&env, config.sample / 3).await;
    }
    let mut samples: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
    let mut paired: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let selected: Vec<&str> = cases.iter().map(|c| c.id).collect();
    for round in 0..config.rounds {
        // Rotate the order each round so that no case always runs after the same neighbour.
        let n = cases.len();
        for i in 0..n {
            let case = cases[(i + round) % n];
            if case.once && round > 0 {
                continue;
            }
            let baseline = case
                .baseline
                .filter(|b| selected.contains(b))
                .and_then(|b| cases.iter().find(|c| c.id == b));
            match baseline {
                None => {
                    let sample = measure(case, &env, config.sample).await;
                    samples.entry(case.id).or_default().push(sample);
                }
                Some(base) => {
                    // Each ratio comes from a baseline sample taken right next to the case's
                    // sample, alternately before and after it, so that drift in the machine's
                    // load cancels out.
                    let (b, c) = if (round + i) % 2 == 0 {
                        let b = measure(base, &env, config.sample).await;
                        (b, measure(case, &env, config.sample).await)
                    } else {
                        let c = measure(case, &env, config.sample).await;
                        (measure(base, &env, config.sample).await, c)
                    };
                    paired.entry(case.id).or_default().push(c.rate() / b.rate());
                    samples.entry(base.id).or_default().push(b);
                    samples.entry(case.id).or_default().push(c);
                }
            }
        }
        eprintln!("round {}/{} done", round + 1, config.rounds);
    }

    let mut rows = Vec::new();
    for case in &cases {
        let own = &samples[case.id];
        let mut rates: Vec<f64> = own.iter().map(Sample::rate).collect();
        let rate = median(&mut rates);
        let ratio = paired.get_mut(case.id).map(|ratios| median(ratios));
        // The spread of the paired ratios: their 25th and 75th percentiles.
        let spread = paired.get(case.id).map(|ratios| {
            let mut sorted = ratios.clone();
            sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
            (at(0.25), at(0.75))
        });
        let mut extras = BTreeMap::new();
        for sample in own {
            for (name, value) in &sample.extra {
                extras.entry(*name).or_insert_with(Vec::new).push(*value);
            }
        }
        let extras: Vec<(&str, f64)> = extras
            .into_iter()
            .map(|(name, mut values)| {
                // Worst-case figures (max waits) report the maximum over rounds, the rest medians.
                let value = if name.starts_with("max") {
                    values.iter().cloned().fold(f64::MIN, f64::max)
                } else {
                    median(&mut values)
                };
                (name, value)
            })
            .collect();
        let met = match (ratio, case.target) {
            (Some(r), Some(t)) => Some(r >= t),
            _ => None,
        };
        rows.push((case, rate, ratio, spread, extras, met));
    }

    let mut table = String::new();
    writeln!(
        table,
        "| scenario | case | median ops/s | µs/op | ratio | p25–p75 | vs | target | extra |"
    )
    .unwrap();
    writeln!(table, "|---|---|---:|---:|---:|---|---|---|---|").unwrap();
    for (case, rate, ratio, spread, extras, met) in &rows {
        let extra = extras
            .iter()
            .map(|(n, v)| format!("{n}={}", fmt_num(*v)))
            .collect::<Vec<_>>()
            .join(", ");
        let target = match (case.target, met) {
            (Some(t), Some(true)) => format!(">= {t}x met"),
            (Some(t), Some(false)) => format!(">= {t}x MISSED"),
            _ => String::new(),
        };
        writeln!(
            table,
            "| {} | {} | {:.0} | {:.1} | {} | {} | {} | {} | {} |",
            case.scenario,
            case.id,
            rate,
            1e6 / rate,
            ratio.map(|r| format!("{r:.2}x")).unwrap_or_default(),
            spread
                .map(|(lo, hi)| format!("{lo:.2}–{hi:.2}"))
                .unwrap_or_default(),
            case.baseline.unwrap_or(""),
            target,
            extra
        )
        .unwrap();
    }
    println!("{table}");

    let mut json = String::from("{\n");
    writeln!(
        json,
        "  \"rounds\": {}, \"sample_ms\": {}, \"threads\": {}, \"cases\": [",
        config.rounds,
        config.sample.as_millis(),
        config.threads.max(1)
    )
    .unwrap();
    for (i, (case, rate, ratio, spread, extras, met)) in rows.iter().enumerate() {
        let extras = extras
            .iter()
            .map(|(n, v)| format!("\"{n}\": {}", json_num(*v)))
            .collect::<Vec<_>>()
            .join(", ");
        write!(
            json,
            "    {{\"scenario\": \"{}\", \"case\": \"{}\", \"ops_per_s\": {}, \"ratio\": {}, \"ratio_p25_p75\": {}, \"baseline\": {}, \"target\": {}, \"met\": {}, \"extra\": {{{}}}}}",
            case.scenario,
            case.id,
            json_num(*rate),
            ratio.map(json_num).unwrap_or_else(|| "null".into()),
            spread
                .map(|(lo, hi)| format!("[{}, {}]", json_num(lo), json_num(hi)))
                .unwrap_or_else(|| "null".into()),
            case.baseline.map(|b| format!("\"{b}\"")).unwrap_or_else(|| "null".into()),
            case.target.map(json_num).unwrap_or_else(|| "null".into()),
            met.map(|m| m.to_string()).unwrap_or_else(|| "null".into()),
            extras
        )
        .unwrap();
        json.push_str(if i + 1 < rows.len() { ",\n" } else { "\n" });
    }
    json.push_str("  ]\n}\n");
    match &config.json {
        Some(path) => std::fs::write(path, &json).expect("write the JSON file"),
        None => println!("{json}"),
    }
    env.cleanup().await;
}

/// Runs one sample of `case`, adding the client CPU its measured loop used per operation.
async fn measure(case: &Case, env: &Env, sample: Duration) -> Sample {
    let mut result = (case.run)(env, sample).await;
    // Client CPU (this process, all threads) per operation: what the library costs beyond the
    // wire, insensitive to how busy the server's cores are.
    result.extra.push((
        "client_cpu_us_per_op",
        result.cpu.as_secs_f64() * 1e6 / result.ops as f64,
    ));
    result
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "null".into()
    }
}
