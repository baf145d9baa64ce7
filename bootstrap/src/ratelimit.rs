//! Token buckets for the IN's enrolment rate limits: per source address and per authenticated
//! identity, so a misbehaving or cloned device cannot re-bootstrap in a loop (superseding its
//! own credential each time) and one address cannot take the IN's whole write capacity.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A rate: `n` enrolments per `per`, with a burst of `n` (config text `"N/DURATION"`,
/// e.g. `"6/1h"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Tokens in a full bucket, and tokens added per `per`.
    pub n: u32,
    /// The refill period.
    pub per: Duration,
}

impl std::str::FromStr for Rate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (n, per) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}`: expected N/DURATION, e.g. 6/1h"))?;
        let n: u32 = n
            .trim()
            .parse()
            .map_err(|_| format!("`{s}`: `{n}` is not a whole number"))?;
        if n == 0 {
            return Err(format!("`{s}`: the number must be at least 1"));
        }
        let per = parse_duration(per.trim()).map_err(|e| format!("`{s}`: {e}"))?;
        if per.is_zero() {
            return Err(format!("`{s}`: the period must be longer than 0"));
        }
        Ok(Rate { n, per })
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}s", self.n, self.per.as_secs_f64())
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Keys tracked at most; beyond this, full buckets (which mean the same as none) are dropped
/// first, and if every tracked key is still limited a new key goes unlimited rather than
/// evicting a limited one (a flood of fresh addresses must not reset the limited ones).
const MAX_KEYS: usize = 100_000;

/// One token bucket per key.
#[derive(Debug)]
pub struct Buckets<K> {
    rate: Rate,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    /// Empty buckets (every key starts full).
    pub fn new(rate: Rate) -> Self {
        Buckets {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn per_token(&self) -> f64 {
        self.rate.per.as_secs_f64() / f64::from(self.rate.n)
    }

    fn refilled(&self, b: Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        (b.tokens + elapsed / self.per_token()).min(f64::from(self.rate.n))
    }

    /// Takes a token for `key` at `now`: `Ok` when there was one, else how long until there
    /// is (nothing is taken then).
    pub fn take(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let Ok(mut map) = self.buckets.lock() else {
            return Ok(()); // a poisoned limiter limits nothing rather than everything
        };
        let full = f64::from(self.rate.n);
        let tokens = match map.get(key) {
            Some(b) => self.refilled(*b, now),
            None => {
                if map.len() >= MAX_KEYS {
                    map.retain(|_, b| self.refilled(*b, now) < full);
                    if map.len() >= MAX_KEYS {
                        return Ok(());
                    }
                }
                full
            }
        };
        if tokens >= 1.0 {
            map.insert(
                key.clone(),
                Bucket {
                    tokens: tokens - 1.0,
                    at: now,
                },
            );
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - tokens) * self.per_token()))
        }
    }
}

/// A duration as written in configs: `500ms`, `10s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .ok_or_else(|| format!("`{s}` needs a unit (ms, s, m, h)"))?;
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => return Err(format!("`{s}`: unknown unit `{unit}` (ms, s, m, h)")),
    };
    if d.is_zero() {
        return Err(format!("`{s}` must be more than zero"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let rate: Rate = "3/1m".parse().unwrap();
        let b = Buckets::new(rate);
        let t0 = Instant::now();
        for _ in 0..3 {
            b.take(&"a", t0).unwrap();
        }
        let wait = b.take(&"a", t0).unwrap_err();
        assert_eq!(wait.as_secs(), 20, "{wait:?}");
        // Another key has its own bucket.
        b.take(&"b", t0).unwrap();
        // After 20 s one token is back, and only one.
        let t1 = t0 + Duration::from_secs(20);
        b.take(&"a", t1).unwrap();
        assert!(b.take(&"a", t1).is_err());
        // A long pause refills to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            b.take(&"a", t2).unwrap();
        }
        assert!(b.take(&"a", t2).is_err());
    }

    #[test]
    fn rates_parse_or_say_why_not() {
        assert_eq!(
            "6/1h".parse::<Rate>().unwrap(),
            Rate {
                n: 6,
                per: Duration::from_secs(3600)
            }
        );
        for bad in ["6", "0/1h", "x/1h", "6/0s", "6/soon", "-1/1h"] {
            let err = bad.parse::<Rate>().unwrap_err();
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn many_keys_stay_bounded() {
        let b = Buckets::new("1/1h".parse().unwrap());
        let t0 = Instant::now();
        for i in 0..MAX_KEYS {
            b.take(&i, t0).unwrap();
        }
        // Every tracked key is limited: a new one goes unlimited, the old stay limited.
        b.take(&usize::MAX, t0).unwrap();
        assert!(b.take(&0, t0).is_err());
        // Once they refilled they are dropped to make room.
        let later = t0 + Duration::from_secs(3600);
        b.take(&(MAX_KEYS + 1), later).unwrap();
        assert!(b.take(&(MAX_KEYS + 1), later).is_err());
        assert!(b.buckets.lock().unwrap().len() <= 2);
    }
}
