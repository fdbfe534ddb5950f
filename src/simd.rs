//! The one place the CPU's vector instruction set is detected and chosen, for the training ops
//! (`ops/`) and the inference engine (`infer/`) alike.
//!
//! Three levels: [`PORTABLE`] (the build's baseline; the only one off x86-64, where the compiler
//! vectorises the portable kernels for the target, e.g. NEON on aarch64), [`AVX2`] (AVX2 + FMA)
//! and [`AVX512`] (F, BW, VL, DQ). [`level`] detects the best one once; `SLIMSERVE_SIMD` caps it.
//! The kernel sets behind it, one module per instruction set:
//! - `infer::avx512` and `infer::avx2`: the f32 engine's hand-written kernels (GEMM tiles,
//!   depthwise, direct input conv, Winograd transforms, pooling), one table per set in
//!   `infer::isa`, which maps the level a layer runs with to its table;
//! - `infer::int8` (`Int8Isa`): the int8 engine's sets (AVX-512 VNNI, AVX2, portable);
//! - [`multiversion!`]: elementwise and training kernels written once in portable Rust and
//!   compiled three times (`#[target_feature]`), dispatching on [`level`].

/// The build's baseline: portable Rust, vectorised by the compiler for the target.
pub const PORTABLE: u8 = 0;
/// AVX2 + FMA (x86-64-v3).
pub const AVX2: u8 = 1;
/// AVX-512 F, BW, VL and DQ (x86-64-v4).
pub const AVX512: u8 = 2;

/// The levels' names, indexed by level.
pub const NAMES: [&str; 3] = ["portable", "AVX2+FMA", "AVX-512"];

/// Vector instruction set the CPU kernels run with: [`AVX512`], [`AVX2`] or [`PORTABLE`] (the
/// build's baseline), detected once. `SLIMSERVE_SIMD=portable|avx2|avx512` caps it (to profile
/// the AVX2 path on an AVX-512 machine, say); it never raises it past what the CPU has.
#[cfg(x86_simd)]
pub(crate) fn level() -> u8 {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<u8> = OnceLock::new();
    #[cfg(test)]
    {
        let forced = testing::FORCED_LEVEL.load(std::sync::atomic::Ordering::Relaxed);
        if forced != u8::MAX {
            return forced;
        }
    }
    *LEVEL.get_or_init(|| {
        let detected = if is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
        {
            AVX512
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            AVX2
        } else {
            PORTABLE
        };
        detected.min(cap(std::env::var("SLIMSERVE_SIMD").ok().as_deref()))
    })
}

/// The level `SLIMSERVE_SIMD` allows (unset: no cap); an unknown value is reported once and
/// ignored.
#[cfg_attr(not(x86_simd), allow(dead_code))]
fn cap(var: Option<&str>) -> u8 {
    match var.map(str::trim) {
        None | Some("") => u8::MAX,
        Some("portable") | Some("baseline") => PORTABLE,
        Some("avx2") => AVX2,
        Some("avx512") => AVX512,
        Some(other) => {
            eprintln!(
                "slimserve: ignoring SLIMSERVE_SIMD={other:?} (expected portable, avx2 or avx512)"
            );
            u8::MAX
        }
    }
}

/// Off x86-64 the kernels are the portable ones (which the compiler vectorises for the target,
/// e.g. NEON on aarch64).
#[cfg(not(x86_simd))]
pub(crate) fn level() -> u8 {
    PORTABLE
}

/// The name of the level the kernels run with ([`NAMES`]), for benchmark headers, and whether
/// the CPU (as CPUID reports it) has AVX-512 at all.
pub fn describe() -> String {
    #[cfg(target_arch = "x86_64")]
    let cpu = if is_x86_feature_detected!("avx512f") {
        "the CPU reports AVX-512"
    } else if is_x86_feature_detected!("avx2") {
        "the CPU reports AVX2, no AVX-512"
    } else {
        "the CPU reports neither AVX2 nor AVX-512"
    };
    #[cfg(not(target_arch = "x86_64"))]
    let cpu = std::env::consts::ARCH;
    format!("{} ({cpu})", NAMES[level() as usize])
}

/// Defines a kernel function compiled three times (AVX-512, AVX2 + FMA, baseline) and
/// dispatching on [`level`] at run time, since the crate itself is built for the baseline
/// x86-64 (SSE2), which leaves the elementwise passes 4 lanes wide. Arguments must be plain
/// identifiers; an optional `<const A: u8>` parameter is passed through.
macro_rules! multiversion {
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident<const $c:ident: u8>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block
    ) => {
        $(#[$meta])*
        #[inline(never)]
        $vis fn $name<const $c: u8>($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body<const $c: u8>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(x86_simd)]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
                unsafe fn v4<const $c: u8>($($arg: $ty),*) $(-> $ret)? {
                    body::<$c>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3<const $c: u8>($($arg: $ty),*) $(-> $ret)? {
                    body::<$c>($($arg),*)
                }
                match $crate::simd::level() {
                    // SAFETY: the CPU has the features (detected at run time).
                    2 => return unsafe { v4::<$c>($($arg),*) },
                    1 => return unsafe { v3::<$c>($($arg),*) },
                    _ => {}
                }
            }
            body::<$c>($($arg),*)
        }
    };
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block
    ) => {
        $(#[$meta])*
        #[inline(never)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(x86_simd)]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                match $crate::simd::level() {
                    // SAFETY: the CPU has the features (detected at run time).
                    2 => return unsafe { v4($($arg),*) },
                    1 => return unsafe { v3($($arg),*) },
                    _ => {}
                }
            }
            body($($arg),*)
        }
    };
    (
        $(#[$meta:meta])*
        $vis:vis unsafe fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block
    ) => {
        $(#[$meta])*
        #[inline(never)]
        $vis unsafe fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            unsafe fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(x86_simd)]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? {
                    // SAFETY: the caller upholds `body`'s contract, which is this function's.
                    unsafe { body($($arg),*) }
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? {
                    // SAFETY: as above.
                    unsafe { body($($arg),*) }
                }
                match $crate::simd::level() {
                    // SAFETY: the CPU has the features (detected at run time); the caller
                    // upholds the function's contract.
                    2 => return unsafe { v4($($arg),*) },
                    1 => return unsafe { v3($($arg),*) },
                    _ => {}
                }
            }
            // SAFETY: the caller upholds the function's contract.
            unsafe { body($($arg),*) }
        }
    };
}
pub(crate) use multiversion;

/// Forcing levels in tests: each kernel test runs every level the CPU has.
#[cfg(test)]
pub(crate) mod testing {
    #[cfg(x86_simd)]
    use super::NAMES;

    /// When not `u8::MAX`, the instruction-set level every multiversioned kernel runs with
    /// (process-wide, so tests that set it must only lower it: all levels agree).
    #[cfg(x86_simd)]
    pub static FORCED_LEVEL: std::sync::atomic::AtomicU8 =
        std::sync::atomic::AtomicU8::new(u8::MAX);

    /// Held by tests that set [`FORCED_LEVEL`] or compare results at tight tolerances.
    pub static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// A line on the test run's own stderr, past libtest's capture: shown even when the test
    /// passes (`eprintln!` is only shown for failures).
    pub fn report(line: &str) {
        use std::io::Write;
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }

    /// Runs `f` once per instruction-set level this build and CPU can run, each forced in turn
    /// (portable, AVX2, AVX-512), and reports (see [`report`]) which ran and which could not,
    /// and why: a level is never skipped silently. Returns the levels run.
    pub fn each_level(what: &str, mut f: impl FnMut(u8)) -> Vec<u8> {
        let _lock = LOCK.lock().unwrap_or_else(|e| e.into_inner());
        #[cfg(x86_simd)]
        {
            use std::sync::atomic::Ordering;
            /// Lifts the forced level even when `f` panics.
            struct Unforce;
            impl Drop for Unforce {
                fn drop(&mut self) {
                    FORCED_LEVEL.store(u8::MAX, Ordering::Relaxed);
                }
            }
            let best = super::level();
            let mut ran = Vec::new();
            for level in 0..NAMES.len() as u8 {
                let name = NAMES[level as usize];
                if level > best {
                    report(&format!(
                        "{what}: {name} NOT tested: this CPU (or SLIMSERVE_SIMD) lacks it"
                    ));
                    continue;
                }
                FORCED_LEVEL.store(level, Ordering::Relaxed);
                let _unforce = Unforce;
                f(level);
                ran.push(level);
            }
            let names: Vec<&str> = ran.iter().map(|&l| NAMES[l as usize]).collect();
            report(&format!("{what}: tested {}", names.join(", ")));
            ran
        }
        #[cfg(not(x86_simd))]
        {
            f(0);
            report(&format!(
                "{what}: tested portable; AVX2 and AVX-512 NOT tested: built without x86 kernels"
            ));
            vec![0]
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn slimserve_simd_caps_the_level() {
        use super::cap;
        assert_eq!(cap(None), u8::MAX);
        assert_eq!(cap(Some("")), u8::MAX);
        assert_eq!(cap(Some("portable")), 0);
        assert_eq!(cap(Some(" avx2 ")), 1);
        assert_eq!(cap(Some("avx512")), 2);
        assert_eq!(cap(Some("sse9")), u8::MAX);
    }
}
