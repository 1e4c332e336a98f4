//! The buffer-liveness allocator: realistic transformer schedules stay
//! within 5% of the lower bound, random schedules always give valid layouts,
//! arena limits split the layout, errors name the problem, and `check`
//! catches broken layouts.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use kiln::alloc::{allocate, check, lower_bound, AllocError, Interval, Layout, Placement};

/// The adapter alignment the planner will pass (min_storage_buffer_offset_alignment).
const ALIGN: u64 = 256;

fn iv(size: u64, first: usize, last: usize) -> Interval {
    Interval { size, first, last }
}

/// xorshift64*: small, deterministic, seedable.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// A seed from the clock, or `KILN_ALLOC_SEED` to replay a failure.
fn seed() -> u64 {
    let seed = match std::env::var("KILN_ALLOC_SEED") {
        Ok(s) => s.parse().expect("KILN_ALLOC_SEED must be an integer"),
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    eprintln!("seed {seed} (replay with KILN_ALLOC_SEED={seed})");
    seed
}

/// A schedule built op by op: each op runs at the next step, writes one
/// buffer and extends the live range of the buffers it reads.
struct Sched {
    iv: Vec<Interval>,
    step: usize,
}

impl Sched {
    fn new() -> Sched {
        Sched {
            iv: Vec::new(),
            step: 0,
        }
    }
    /// An op that reads `reads` and writes a new buffer of `size` bytes.
    fn op(&mut self, size: u64, reads: &[usize]) -> usize {
        let s = self.step;
        self.step += 1;
        for &r in reads {
            self.iv[r].last = s;
        }
        self.iv.push(iv(size, s, s));
        self.iv.len() - 1
    }
    /// A step that only reads (e.g. the host reading logits back).
    fn read(&mut self, reads: &[usize]) {
        let s = self.step;
        self.step += 1;
        for &r in reads {
            self.iv[r].last = s;
        }
    }
}

/// Shape of a generated transformer schedule.
#[derive(Debug, Clone, Copy)]
struct Shape {
    /// Tokens per step.
    t: u64,
    /// Layers.
    n_layer: usize,
    /// k and v take a third of q (grouped-query attention).
    gqa: bool,
    /// FFN hidden width in units of the model width.
    ffn: u64,
    /// Attention materialises its scores and probabilities.
    unfused_attn: bool,
}

/// The intermediates of a llama-style model (SmolLM2-135M widths: 576
/// wide f32, 9 heads, vocabulary 49152), one op per step: the residual
/// stream lives ~6-9 steps, everything else 1-3.
fn transformer(sh: Shape) -> Vec<Interval> {
    let d = 576 * 4 * sh.t;
    let kv = if sh.gqa { d / 3 } else { d };
    let f = sh.ffn * d;
    let ctx = if sh.t == 1 { 1024 } else { sh.t };
    let scores = 9 * sh.t * ctx * 4;
    let mut s = Sched::new();
    let mut x = s.op(d, &[]); // embedding
    for _ in 0..sh.n_layer {
        let n1 = s.op(d, &[x]);
        let q = s.op(d, &[n1]);
        let k = s.op(kv, &[n1]);
        let v = s.op(kv, &[n1]);
        let qr = s.op(d, &[q]);
        let kr = s.op(kv, &[k]);
        let a = if sh.unfused_attn {
            let sc = s.op(scores, &[qr, kr]);
            let p = s.op(scores, &[sc]);
            s.op(d, &[p, v])
        } else {
            s.op(d, &[qr, kr, v])
        };
        let o = s.op(d, &[a]);
        let x2 = s.op(d, &[x, o]);
        let n2 = s.op(d, &[x2]);
        let g = s.op(f, &[n2]);
        let u = s.op(f, &[n2]);
        let m = s.op(f, &[g, u]);
        let dn = s.op(d, &[m]);
        x = s.op(d, &[x2, dn]);
    }
    let nf = s.op(d, &[x]);
    // Prefill keeps only the last token's logits.
    let logits = s.op(49152 * 4, &[nf]);
    s.read(&[logits]);
    s.iv
}

/// Allocate, check, and test the invariants every layout must hold.
fn allocate_checked(ivs: &[Interval], align: u64, max_arena: u64) -> Result<Layout, String> {
    let l = allocate(ivs, align, max_arena).map_err(|e| e.to_string())?;
    check(ivs, align, &l)?;
    let lb = lower_bound(ivs, align);
    let naive: u64 = ivs
        .iter()
        .map(|v| v.size.max(1).div_ceil(align) * align)
        .sum();
    if l.lower_bound != lb || l.naive != naive {
        return Err(format!(
            "layout bounds lower {} naive {}, expected {lb} {naive}",
            l.lower_bound, l.naive
        ));
    }
    if l.peak < lb || l.peak > naive {
        return Err(format!("peak {} outside [{lb}, {naive}]", l.peak));
    }
    if let Some(a) = l.arenas.iter().find(|a| **a > max_arena) {
        return Err(format!("arena of {a} bytes over the limit {max_arena}"));
    }
    // Each step's live bytes fit in the arenas, so this many are needed.
    if (l.arenas.len() as u64) < lb.div_ceil(max_arena) {
        return Err(format!(
            "{} arenas cannot hold {lb} live bytes under {max_arena}",
            l.arenas.len()
        ));
    }
    Ok(l)
}

#[test]
fn transformer_schedules_near_lower_bound() {
    let mut worst: f64 = 0.0;
    for t in [1, 512] {
        for gqa in [false, true] {
            for ffn in [3, 4] {
                for unfused_attn in [false, true] {
                    let sh = Shape {
                        t,
                        n_layer: 30,
                        gqa,
                        ffn,
                        unfused_attn,
                    };
                    let ivs = transformer(sh);
                    let start = Instant::now();
                    let l = allocate_checked(&ivs, ALIGN, u64::MAX).unwrap();
                    let took = start.elapsed();
                    assert_eq!(l.arenas.len(), 1, "{sh:?}: one arena fits everything");
                    let ratio = l.peak as f64 / l.lower_bound as f64;
                    eprintln!(
                        "{sh:?}: {} buffers, peak {} lower bound {} naive {} ratio {ratio:.4} \
                         ({took:?})",
                        ivs.len(),
                        l.peak,
                        l.lower_bound,
                        l.naive
                    );
                    assert!(
                        l.peak as f64 <= 1.05 * l.lower_bound as f64,
                        "{sh:?}: peak {} is more than 1.05 x the lower bound {}",
                        l.peak,
                        l.lower_bound
                    );
                    // Sharing must actually happen: far below one buffer each
                    // (at T = 1 the logits, 85 D, dominate both).
                    assert!(
                        l.peak * 4 < l.naive,
                        "{sh:?}: peak {} naive {}",
                        l.peak,
                        l.naive
                    );
                    worst = worst.max(ratio);
                }
            }
        }
    }
    eprintln!("worst ratio {worst:.4}");
}

/// A transformer-like schedule with random widths, chain lengths and
/// occasional skip buffers kept across layers.
fn jittered(rng: &mut Rng) -> Vec<Interval> {
    let t = [1, 7, 64, 512][rng.range(0, 3) as usize];
    let d = rng.range(64, 1024) * 4 * t;
    let mut s = Sched::new();
    let mut x = s.op(d, &[]);
    let mut keep: Vec<usize> = Vec::new();
    for _ in 0..rng.range(4, 32) {
        let n1 = s.op(d, &[x]);
        let mut last = n1;
        for _ in 0..rng.range(2, 8) {
            let w = d * rng.range(1, 4) / rng.range(1, 3);
            let reads = if rng.range(0, 3) == 0 {
                vec![last, n1]
            } else {
                vec![last]
            };
            last = s.op(w, &reads);
        }
        let x2 = s.op(d, &[x, last]);
        let n2 = s.op(d, &[x2]);
        let g = s.op(rng.range(2, 4) * d, &[n2]);
        let u = s.op(rng.range(2, 4) * d, &[n2]);
        let m = s.op(rng.range(2, 4) * d, &[g, u]);
        let dn = s.op(d, &[m]);
        // Now and then a buffer kept for a later layer (a skip connection).
        if rng.range(0, 4) == 0 {
            keep.push(s.op(d / 2, &[n2]));
        }
        if keep.len() > 2 || rng.range(0, 3) == 0 {
            let reads: Vec<usize> = keep.drain(..).chain([x2, dn]).collect();
            x = s.op(d, &reads);
        } else {
            x = s.op(d, &[x2, dn]);
        }
    }
    let out = s.op(d, &[x]);
    s.read(&[out]);
    s.iv
}

/// Random schedules that look like transformer layers but with random
/// widths, lifetimes and occasional long-lived buffers. Harder than real
/// plans (whose layers are all alike): over 20 000 cases about 0.2% came out
/// above 1.05 x the lower bound (which is not always reachable), none above
/// 1.10. So: every case within 1.15, and on average within 1.01.
#[test]
fn jittered_transformer_schedules_near_lower_bound() {
    let seed = seed();
    let mut rng = Rng::new(seed);
    let (mut worst, mut sum, cases) = (0f64, 0f64, 40);
    for case in 0..cases {
        let ivs = jittered(&mut rng);
        let l = allocate_checked(&ivs, ALIGN, u64::MAX)
            .unwrap_or_else(|e| panic!("seed {seed} case {case}: {e}"));
        let ratio = l.peak as f64 / l.lower_bound as f64;
        worst = worst.max(ratio);
        sum += ratio;
        assert!(
            ratio <= 1.15,
            "seed {seed} case {case}: peak {} lower bound {} ratio {ratio:.4}",
            l.peak,
            l.lower_bound
        );
    }
    let mean = sum / cases as f64;
    eprintln!("mean ratio {mean:.4}, worst {worst:.4}");
    assert!(mean <= 1.01, "seed {seed}: mean ratio {mean:.4}");
}

#[test]
fn random_intervals_give_valid_layouts() {
    let seed = seed();
    let mut rng = Rng::new(seed);
    let mut ratios = Vec::new();
    for case in 0..500 {
        let n = rng.range(0, 120) as usize;
        let steps = rng.range(1, 60) as usize;
        let align = [1, 4, 256, 4096][rng.range(0, 3) as usize];
        let ivs: Vec<Interval> = (0..n)
            .map(|_| {
                let size = match rng.range(0, 9) {
                    0 => 0,
                    1 => rng.range(1, 16),
                    2..=6 => rng.range(1, 1 << 16),
                    _ => rng.range(1, 1 << 22),
                };
                let first = rng.range(0, steps as u64 - 1) as usize;
                let len = match rng.range(0, 4) {
                    0 => rng.range(0, steps as u64),
                    _ => rng.range(0, 2),
                } as usize;
                iv(size, first, (first + len).min(steps - 1))
            })
            .collect();
        let biggest = ivs
            .iter()
            .map(|v| v.size.max(1).div_ceil(align) * align)
            .max();
        let max_arena = match (rng.range(0, 2), biggest) {
            (0, Some(b)) => b + rng.range(0, b),
            _ => u64::MAX,
        };
        let l = allocate_checked(&ivs, align, max_arena)
            .unwrap_or_else(|e| panic!("seed {seed} case {case} (n {n}, align {align}): {e}"));
        // lower_bound against a step-by-step count.
        let brute = (0..steps)
            .map(|s| {
                ivs.iter()
                    .filter(|v| v.first <= s && s <= v.last)
                    .map(|v| v.size.max(1).div_ceil(align) * align)
                    .sum::<u64>()
            })
            .max()
            .unwrap_or(0);
        assert_eq!(l.lower_bound, brute, "seed {seed} case {case}");
        if n > 0 && max_arena == u64::MAX {
            ratios.push(l.peak as f64 / l.lower_bound as f64);
        }
    }
    ratios.sort_by(f64::total_cmp);
    if !ratios.is_empty() {
        eprintln!(
            "random peak/lower bound, one arena: median {:.3}, max {:.3}",
            ratios[ratios.len() / 2],
            ratios[ratios.len() - 1]
        );
    }
}

#[test]
fn small_arena_limit_forces_several_arenas() {
    let sh = Shape {
        t: 512,
        n_layer: 30,
        gqa: true,
        ffn: 4,
        unfused_attn: false,
    };
    let ivs = transformer(sh);
    let d = 576 * 4 * 512;
    let one = allocate_checked(&ivs, ALIGN, u64::MAX).unwrap();
    // Gate, up and their product (4 D each) are live together and no two
    // fit in a 5 D arena: three arenas, which also hold everything else.
    let max_arena = 5 * d;
    let l = allocate_checked(&ivs, ALIGN, max_arena).unwrap();
    eprintln!(
        "max_arena {max_arena}: arenas {:?}, peak {} (one arena: {}), lower bound {}",
        l.arenas, l.peak, one.peak, l.lower_bound
    );
    assert_eq!(l.arenas.len(), 3, "arenas {:?}", l.arenas);
    let used: Vec<usize> = l.placements.iter().map(|p| p.arena).collect();
    for a in 0..l.arenas.len() {
        assert!(used.contains(&a), "arena {a} is empty");
    }

    // Four buffers live together, two fit per arena: exactly two arenas.
    let ivs = vec![iv(100, 0, 1); 4];
    let l = allocate_checked(&ivs, ALIGN, 512).unwrap();
    assert_eq!(l.arenas, vec![512, 512]);
    // Disjoint lifetimes share one arena and one offset.
    let ivs: Vec<Interval> = (0..10).map(|s| iv(1000, s, s)).collect();
    let l = allocate_checked(&ivs, ALIGN, 1024).unwrap();
    assert_eq!(l.arenas, vec![1024]);
    assert!(l.placements.iter().all(|p| p.offset == 0 && p.arena == 0));
}

#[test]
fn edge_cases() {
    let l = allocate_checked(&[], ALIGN, 1 << 20).unwrap();
    assert_eq!((l.peak, l.naive, l.lower_bound), (0, 0, 0));
    assert!(l.arenas.is_empty());

    // Zero-size buffers take one alignment unit each and still never collide.
    let ivs = vec![iv(0, 3, 3); 3];
    let l = allocate_checked(&ivs, ALIGN, 1 << 20).unwrap();
    assert_eq!(l.peak, 3 * ALIGN);

    // Sizes near the top of u64: no overflow, a second arena instead.
    let half = 1u64 << 63;
    let ivs = [iv(half - 5, 0, 0), iv(half, 0, 0)];
    let l = allocate(&ivs, ALIGN, u64::MAX).unwrap();
    assert_eq!(l.arenas, vec![half, half]);
    assert_eq!(l.peak, u64::MAX, "peak saturates");
    check(&ivs, ALIGN, &l).unwrap();

    // A buffer exactly the arena limit.
    let l = allocate_checked(&[iv(1 << 20, 0, 0)], ALIGN, 1 << 20).unwrap();
    assert_eq!(l.arenas, vec![1 << 20]);
}

#[test]
fn errors_name_the_problem() {
    let e = allocate(&[iv(10, 0, 1), iv(3 << 20, 2, 2)], ALIGN, 1 << 20).unwrap_err();
    assert_eq!(
        e,
        AllocError::TooLarge {
            index: 1,
            size: 3 << 20,
            aligned: 3 << 20,
            max_arena: 1 << 20
        }
    );
    let msg = e.to_string();
    for want in ["buffer 1", "3145728", "1048576", "fewer tokens per step"] {
        assert!(msg.contains(want), "{msg:?} lacks {want:?}");
    }
    // Rounding up to the alignment can push a buffer over the limit.
    let e = allocate(&[iv(1000, 0, 0)], 1024, 1000).unwrap_err();
    assert!(
        matches!(
            e,
            AllocError::TooLarge {
                index: 0,
                aligned: 1024,
                ..
            }
        ),
        "{e}"
    );

    let e = allocate(&[iv(10, 0, 1), iv(10, 5, 4)], ALIGN, 1 << 20).unwrap_err();
    assert_eq!(
        e,
        AllocError::BadInterval {
            index: 1,
            first: 5,
            last: 4
        }
    );
    let msg = e.to_string();
    assert!(
        msg.contains("buffer 1") && msg.contains("first <= last"),
        "{msg}"
    );

    for align in [0, 3, 100] {
        let e = allocate(&[iv(10, 0, 0)], align, 1 << 20).unwrap_err();
        assert_eq!(e, AllocError::BadAlign { align });
        assert!(e.to_string().contains("power of two"), "{e}");
    }
}

fn layout(placements: &[(usize, u64)], arenas: &[u64]) -> Layout {
    Layout {
        placements: placements
            .iter()
            .map(|&(arena, offset)| Placement { arena, offset })
            .collect(),
        arenas: arenas.to_vec(),
        peak: arenas.iter().sum(),
        naive: 0,
        lower_bound: 0,
    }
}

#[test]
fn check_catches_broken_layouts() {
    let ivs = [iv(512, 0, 2), iv(256, 2, 3), iv(256, 4, 5), iv(100, 1, 1)];
    // Valid: 0 and 2 share bytes (disjoint lifetimes), 1 and 3 sit above 0.
    let ok = layout(&[(0, 0), (0, 512), (0, 0), (0, 768)], &[1024]);
    check(&ivs, ALIGN, &ok).unwrap();

    // 0 and 1 share step 2 and bytes 256..512.
    let bad = layout(&[(0, 0), (0, 256), (0, 0), (0, 768)], &[1024]);
    let e = check(&ivs, ALIGN, &bad).unwrap_err();
    assert!(
        e.contains("buffers 0 ") && e.contains("and 1 ") && e.contains("step 2"),
        "{e}"
    );

    // 3 starts inside 0, both live at step 1.
    let bad = layout(&[(0, 0), (0, 512), (0, 0), (0, 256)], &[1024]);
    let e = check(&ivs, ALIGN, &bad).unwrap_err();
    assert!(
        e.contains("buffers 0 ") && e.contains("and 3 ") && e.contains("step 1"),
        "{e}"
    );

    // The same offsets in different arenas do not collide.
    let split = layout(&[(0, 0), (1, 0), (0, 0), (1, 256)], &[512, 512]);
    check(&ivs, ALIGN, &split).unwrap();

    // 3 takes its aligned 256 bytes: at 512 it passes the end of a 612-byte arena.
    let e = check(
        &ivs,
        ALIGN,
        &layout(&[(0, 0), (1, 0), (0, 0), (0, 512)], &[612, 256]),
    );
    assert!(e.unwrap_err().contains("past the end"));
    // Misaligned, missing arena, wrong count, wrong peak.
    let e = check(
        &ivs,
        ALIGN,
        &layout(&[(0, 0), (0, 512), (0, 0), (0, 776)], &[1280]),
    );
    assert!(e.unwrap_err().contains("not a multiple"));
    let e = check(
        &ivs,
        ALIGN,
        &layout(&[(0, 0), (0, 512), (0, 0), (1, 0)], &[1024]),
    );
    assert!(e.unwrap_err().contains("arena 1"));
    let e = check(&ivs, ALIGN, &layout(&[(0, 0)], &[1024]));
    assert!(e.unwrap_err().contains("1 placements for 4"));
    let mut wrong = ok.clone();
    wrong.peak += 1;
    assert!(check(&ivs, ALIGN, &wrong).unwrap_err().contains("peak"));
}

/// A 512-token prefill plan of ~1000 buffers (a 32-layer model's worth at
/// the planner's ~30 buffers a layer) and 4000 random intervals place well
/// under a second each.
#[test]
fn fast_enough() {
    let ivs = transformer(Shape {
        t: 512,
        n_layer: 64,
        gqa: true,
        ffn: 3,
        unfused_attn: true,
    });
    let n_plan = ivs.len();
    let start = Instant::now();
    allocate(&ivs, ALIGN, u64::MAX).unwrap();
    let plan = start.elapsed();

    let mut rng = Rng::new(seed());
    let ivs: Vec<Interval> = (0..4000)
        .map(|_| {
            let first = rng.range(0, 2000) as usize;
            let len = if rng.range(0, 9) == 0 {
                rng.range(0, 40)
            } else {
                rng.range(0, 2)
            };
            iv(rng.range(1, 1 << 24), first, first + len as usize)
        })
        .collect();
    let start = Instant::now();
    let l = allocate(&ivs, ALIGN, 1 << 30).unwrap();
    let random = start.elapsed();
    let start = Instant::now();
    check(&ivs, ALIGN, &l).unwrap();
    let checked = start.elapsed();
    eprintln!(
        "plan of {} buffers: {plan:?}; 4000 random: {random:?} (check {checked:?}), \
         ratio {:.3}, {} arenas",
        n_plan,
        l.peak as f64 / l.lower_bound as f64,
        l.arenas.len()
    );
    // Generous (the machine may be shared): a cubic blow-up would take minutes.
    assert!(plan.as_secs_f64() < 1.0, "plan took {plan:?}");
    assert!(random.as_secs_f64() < 2.0, "4000 intervals took {random:?}");
}
