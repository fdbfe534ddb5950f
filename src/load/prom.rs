//! Just enough Prometheus: fetch a `/metrics` page over plain HTTP and sum samples of the
//! text exposition format by name and labels.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// GETs `url` (`http://HOST:PORT/PATH`) and returns the body of a 200 answer.
pub async fn fetch(url: &str) -> Result<String> {
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("metrics URL `{url}`: only http://HOST:PORT/PATH is supported"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    let io = async {
        let mut stream = TcpStream::connect(host).await?;
        // HTTP/1.0: the server closes the connection after the body, no chunked encoding.
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
            .await?;
        let mut raw = Vec::new();
        stream.take(256 << 20).read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), io)
        .await
        .with_context(|| format!("{url}: no answer within 10 s"))?
        .with_context(|| format!("cannot fetch {url}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .with_context(|| format!("{url}: not an HTTP answer"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("{url}: {status}");
    }
    Ok(body.to_string())
}

/// One sample line: `name{k="v",...} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the text exposition format (comments and malformed lines are skipped).
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = line.rfind('}')?;
            (
                &line[..open],
                parse_labels(&line[open + 1..close])?,
                &line[close + 1..],
            )
        }
        None => {
            let sp = line.find(' ')?;
            (&line[..sp], BTreeMap::new(), &line[sp..])
        }
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.trim().to_string(),
        labels,
        value,
    })
}

fn parse_labels(s: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(out);
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if chars.next()? != '"' {
            return None;
        }
        let mut value = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                '"' => break,
                c => value.push(c),
            }
        }
        out.insert(key.trim().to_string(), value);
    }
}

/// Sum of the samples named `name` whose labels include every pair in `with`.
pub fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            with.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP x_seconds help
# TYPE x_seconds histogram
x_seconds_bucket{model="a",le="0.1"} 3
x_seconds_bucket{model="a",le="+Inf"} 4
x_seconds_sum{model="a"} 0.5
x_seconds_count{model="a"} 4
x_seconds_count{model="b"} 6
requests_total{model="a",code="OK",note="q\"uo,te"} 7
plain 1.5e3
"#;

    #[test]
    fn parses_and_sums() {
        let s = parse(TEXT);
        assert_eq!(s.len(), 7);
        assert_eq!(sum(&s, "x_seconds_count", &[]), 10.0);
        assert_eq!(sum(&s, "x_seconds_count", &[("model", "a")]), 4.0);
        assert_eq!(sum(&s, "x_seconds_sum", &[("model", "b")]), 0.0);
        assert_eq!(sum(&s, "plain", &[]), 1500.0);
        assert_eq!(
            sum(&s, "x_seconds_bucket", &[("model", "a"), ("le", "+Inf")]),
            4.0
        );
        let r = s.iter().find(|x| x.name == "requests_total").unwrap();
        assert_eq!(r.labels["note"], "q\"uo,te");
        assert_eq!(r.labels["code"], "OK");
    }
}
