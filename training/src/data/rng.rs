//! A tiny self-contained PRNG (SplitMix64). Splits, shuffles and augmentations must stay
//! reproducible across builds and dependency upgrades, so they do not use `rand`'s generators
//! (whose streams are allowed to change between versions).

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub(crate) struct Rng {
    state: u64,
}

impl Rng {
    /// A generator keyed by several integers (e.g. seed, epoch, sample index).
    pub fn derive(parts: &[u64]) -> Self {
        let mut s = 0x5EED_5117_7A11_0F0Fu64;
        for &p in parts {
            s = mix(s.wrapping_add(GOLDEN) ^ p);
        }
        Self { state: s }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix(self.state)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, n) (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_key_sensitive() {
        let a: Vec<u64> = (0..4).map(|_| Rng::derive(&[1, 2]).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        assert_ne!(
            Rng::derive(&[1, 2]).next_u64(),
            Rng::derive(&[2, 1]).next_u64()
        );
        let mut r = Rng::derive(&[7]);
        for _ in 0..1000 {
            let u = r.unit();
            assert!((0.0..1.0).contains(&u));
            assert!(r.below(3) < 3);
        }
        let mut v: Vec<usize> = (0..50).collect();
        Rng::derive(&[3]).shuffle(&mut v);
        assert_ne!(v, (0..50).collect::<Vec<_>>());
        v.sort();
        assert_eq!(v, (0..50).collect::<Vec<_>>());
    }
}
