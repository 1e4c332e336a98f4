//! The buffer-liveness allocator: places every intermediate buffer of a
//! kernel schedule into a few arenas (GPU storage buffers), so that buffers
//! live at a common step never share bytes and buffers whose lifetimes are
//! disjoint do.
//!
//! The planner describes each buffer by an [`Interval`]: its byte size and
//! the schedule steps from the one that writes it to the last one that reads
//! it. [`allocate`] returns a [`Layout`]: an arena and a byte offset per
//! buffer, and the size of each arena. [`check`] verifies a layout, and
//! [`lower_bound`] is the least any layout can take (the most bytes live at
//! one step), to judge a layout against.
//!
//! # Algorithm
//!
//! Greedy placement with best fit. Sizes are first rounded up to the offset
//! alignment (a zero size takes one alignment unit: a binding cannot be
//! empty). Buffers are placed one at a time, in an order given below. For
//! each buffer, every arena is scanned for the gaps
//! between the already-placed buffers whose live ranges intersect its own
//! (including the room between the highest of them and the arena's current
//! end); the buffer goes into the fitting gap that grows its arena least,
//! then wastes least (best fit), then into the earliest arena. A new arena
//! is opened only when the buffer fits in no existing arena under
//! `max_arena`. An arena's size is the highest end placed in it.
//!
//! The pass is run for four orders and the layout with the fewest arenas,
//! then the fewest bytes, is kept: largest first (ties: earlier first
//! step); largest area first (size × steps live: long-lived
//! buffers are the hardest to fit late); and by breadth, the buffers of the
//! busiest steps first, then by size or by area. On transformer-like
//! schedules at least one of them almost always reaches the lower bound.
//! Each pass is O(n²) in the number of buffers (each scans those placed
//! before it).

use std::cmp::Ordering;

/// A buffer to place: its byte size and its live range over the schedule,
/// inclusive: it is written at step `first` and last read at step `last`
/// (`first <= last`). Two buffers whose ranges share a step must not overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Interval {
    /// Size in bytes; zero is placed as one alignment unit.
    pub size: u64,
    /// The step that writes the buffer.
    pub first: usize,
    /// The last step that reads the buffer (`>= first`).
    pub last: usize,
}

impl Interval {
    /// Whether two live ranges share a step.
    fn meets(&self, other: &Interval) -> bool {
        self.first <= other.last && other.first <= self.last
    }
}

/// Where one buffer lives: an arena and a byte offset into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Placement {
    /// Index into [`Layout::arenas`].
    pub arena: usize,
    /// Byte offset into the arena, a multiple of the alignment.
    pub offset: u64,
}

/// The result of [`allocate`]: a placement per buffer and the arena sizes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Layout {
    /// One placement per input interval, in the same order.
    pub placements: Vec<Placement>,
    /// Size in bytes of each arena (each at most `max_arena`).
    pub arenas: Vec<u64>,
    /// Sum of the arena sizes (saturating): the bytes the layout takes.
    pub peak: u64,
    /// Sum of all aligned sizes: the bytes if every buffer had its own.
    pub naive: u64,
    /// [`lower_bound`] of the intervals: no layout can take fewer bytes.
    pub lower_bound: u64,
}

/// Why [`allocate`] could not place the buffers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// The alignment is zero or not a power of two.
    #[error(
        "buffer alignment {align} is not a power of two: pass the adapter's \
         min_storage_buffer_offset_alignment (e.g. 256)"
    )]
    BadAlign {
        /// The alignment given.
        align: u64,
    },
    /// An interval whose last step comes before its first.
    #[error(
        "buffer {index} is last read at step {last}, before it is written at step {first}: \
         the planner must give every buffer first <= last"
    )]
    BadInterval {
        /// Index of the interval.
        index: usize,
        /// Its first step.
        first: usize,
        /// Its last step.
        last: usize,
    },
    /// A single buffer that does not fit in the largest arena the adapter allows.
    #[error(
        "buffer {index} needs {aligned} bytes ({size} rounded up to the alignment), more than \
         the largest storage buffer the adapter can bind ({max_arena} bytes, \
         max_storage_buffer_binding_size): run fewer tokens per step"
    )]
    TooLarge {
        /// Index of the interval.
        index: usize,
        /// Its size in bytes.
        size: u64,
        /// Its size rounded up to the alignment.
        aligned: u64,
        /// The arena limit.
        max_arena: u64,
    },
}

/// The sum of arena sizes, without overflow.
fn total(arenas: &[u64]) -> u128 {
    arenas.iter().map(|a| *a as u128).sum()
}

/// `size` rounded up to a multiple of `align` (zero takes one unit),
/// saturating at the largest multiple; `align` 0 counts as 1.
fn aligned_size(size: u64, align: u64) -> u64 {
    let align = align.max(1);
    if size == 0 {
        return align;
    }
    match size.div_ceil(align).checked_mul(align) {
        Some(s) => s,
        None => u64::MAX / align * align,
    }
}

/// The least bytes any layout of `iv` can take: the maximum over steps of
/// the sum of the aligned sizes of the buffers live at that step.
///
/// Sizes are rounded up to `align` as in [`allocate`] (zero takes one
/// unit; `align` 0 counts as 1). Intervals with `first > last` are ignored
/// ([`allocate`] rejects them). The sum saturates at `u64::MAX`.
pub fn lower_bound(iv: &[Interval], align: u64) -> u64 {
    // Events (step, is_end, size): at a step, starts come before ends, so a
    // buffer written at the step where another is last read counts with it.
    let mut events: Vec<(usize, bool, u64)> = Vec::with_capacity(2 * iv.len());
    for v in iv.iter().filter(|v| v.first <= v.last) {
        let s = aligned_size(v.size, align);
        events.push((v.first, false, s));
        events.push((v.last, true, s));
    }
    events.sort_unstable();
    let (mut live, mut best) = (0u128, 0u128);
    for (_, is_end, s) in events {
        if is_end {
            live -= s as u128;
        } else {
            live += s as u128;
            best = best.max(live);
        }
    }
    best.min(u64::MAX as u128) as u64
}

/// Place every interval into arenas: offsets are multiples of `align` (a
/// power of two: the adapter's `min_storage_buffer_offset_alignment`, e.g.
/// 256), no buffer crosses its arena's end, every arena is at most
/// `max_arena` bytes (the adapter's `max_storage_buffer_binding_size`), and
/// as few arenas are used as the greedy placement finds (see the
/// [module docs](self)).
///
/// Zero-size intervals are placed as `align` bytes. Fails on a bad
/// alignment, an interval with `first > last`, or a buffer larger than
/// `max_arena` once aligned.
pub fn allocate(iv: &[Interval], align: u64, max_arena: u64) -> Result<Layout, AllocError> {
    if !align.is_power_of_two() {
        return Err(AllocError::BadAlign { align });
    }
    let mut sizes = Vec::with_capacity(iv.len());
    for (index, v) in iv.iter().enumerate() {
        if v.first > v.last {
            return Err(AllocError::BadInterval {
                index,
                first: v.first,
                last: v.last,
            });
        }
        let aligned = aligned_size(v.size, align);
        if aligned > max_arena {
            return Err(AllocError::TooLarge {
                index,
                size: v.size,
                aligned,
                max_arena,
            });
        }
        sizes.push(aligned);
    }

    let mut best: Option<(Vec<Placement>, Vec<u64>)> = None;
    for order in &orders(iv, &sizes) {
        let (placements, arenas) = place(iv, &sizes, order, max_arena);
        let better = match &best {
            None => true,
            Some((_, b)) => (arenas.len(), total(&arenas)) < (b.len(), total(b)),
        };
        if better {
            best = Some((placements, arenas));
        }
    }
    let (placements, arenas) = best.unwrap_or_default();
    Ok(Layout {
        peak: total(&arenas).min(u64::MAX as u128) as u64,
        naive: sizes.iter().fold(0u64, |a, s| a.saturating_add(*s)),
        lower_bound: lower_bound(iv, align),
        placements,
        arenas,
    })
}

/// The orders [`allocate`] places buffers in, each a permutation of the
/// indices: largest first (ties: earlier first step); largest area (size ×
/// steps live) first; and twice by breadth, buffers of the busiest steps
/// first (the most bytes live at any step of their range), then largest or
/// largest area first. Remaining ties keep the input order.
fn orders(iv: &[Interval], sizes: &[u64]) -> [Vec<usize>; 4] {
    let area = |i: usize| sizes[i] as u128 * (iv[i].last - iv[i].first) as u128 + sizes[i] as u128;
    let busiest = busiest(iv, sizes);
    let by_size = |a: usize, b: usize| sizes[b].cmp(&sizes[a]).then(iv[a].first.cmp(&iv[b].first));
    let by_area = |a: usize, b: usize| area(b).cmp(&area(a)).then(by_size(a, b));
    let sorted = |key: &dyn Fn(usize, usize) -> Ordering| {
        let mut o: Vec<usize> = (0..iv.len()).collect();
        o.sort_by(|a, b| key(*a, *b));
        o
    };
    [
        sorted(&by_size),
        sorted(&by_area),
        sorted(&|a, b| busiest[b].cmp(&busiest[a]).then(by_size(a, b))),
        sorted(&|a, b| busiest[b].cmp(&busiest[a]).then(by_area(a, b))),
    ]
}

/// For each buffer, the most bytes live at any step of its range.
///
/// The live set only grows at a `first` step, so the steps that are some
/// buffer's `first` or `last` are enough to look at. O(n log n) to build
/// the counts, then at most O(n) per buffer.
fn busiest(iv: &[Interval], sizes: &[u64]) -> Vec<u128> {
    let mut steps: Vec<usize> = iv.iter().flat_map(|v| [v.first, v.last]).collect();
    steps.sort_unstable();
    steps.dedup();
    let at = |s: usize| steps.partition_point(|x| *x < s);
    // Difference array over the distinct steps, then prefix sums.
    let mut live = vec![0i128; steps.len() + 1];
    for (v, s) in iv.iter().zip(sizes) {
        live[at(v.first)] += *s as i128;
        live[at(v.last) + 1] -= *s as i128;
    }
    let mut acc = 0i128;
    for l in live.iter_mut() {
        acc += *l;
        *l = acc;
    }
    iv.iter()
        .map(|v| {
            live[at(v.first)..=at(v.last)]
                .iter()
                .max()
                .copied()
                .unwrap_or(0) as u128
        })
        .collect()
}

/// A placed buffer, as an arena keeps it (sorted by offset).
#[derive(Debug, Clone, Copy)]
struct Slot {
    offset: u64,
    end: u64,
    first: usize,
    last: usize,
}

/// One greedy pass: place the buffers in `order`; returns the placements
/// (input order) and the arena sizes. `sizes` are aligned and each fits
/// under `max_arena`.
fn place(
    iv: &[Interval],
    sizes: &[u64],
    order: &[usize],
    max_arena: u64,
) -> (Vec<Placement>, Vec<u64>) {
    let mut placements = vec![
        Placement {
            arena: 0,
            offset: 0
        };
        iv.len()
    ];
    let mut arenas: Vec<Vec<Slot>> = Vec::new();
    let mut tops: Vec<u64> = Vec::new();
    for &i in order {
        let (s, v) = (sizes[i], iv[i]);
        // Best candidate: (growth, waste, arena, offset); lexicographic min.
        let mut best: Option<(u64, u64, usize, u64)> = None;
        for (a, slots) in arenas.iter().enumerate() {
            let top = tops[a];
            let mut consider = |offset: u64, gap_end: Option<u64>| {
                let end = match offset.checked_add(s) {
                    Some(end) if end <= max_arena => end,
                    _ => return,
                };
                // A gap bounded by a colliding buffer, or the room up to the
                // arena's current end, wastes what is left of it; growing
                // the arena wastes nothing but the growth.
                let bound = gap_end.unwrap_or(top);
                let (growth, waste) = if end <= bound {
                    (0, bound - end)
                } else {
                    (end - top, 0)
                };
                let c = (growth, waste, a, offset);
                if best.is_none_or(|b| c < b) {
                    best = Some(c);
                }
            };
            let mut cursor = 0u64;
            for sl in slots {
                if sl.first > v.last || v.first > sl.last {
                    continue;
                }
                if sl.offset >= cursor && sl.offset - cursor >= s {
                    consider(cursor, Some(sl.offset));
                }
                cursor = cursor.max(sl.end);
            }
            consider(cursor, None);
        }
        let (a, offset) = match best {
            Some((_, _, a, offset)) => (a, offset),
            None => {
                arenas.push(Vec::new());
                tops.push(0);
                (arenas.len() - 1, 0)
            }
        };
        let end = offset + s;
        let slots = &mut arenas[a];
        let at = slots.partition_point(|x| x.offset <= offset);
        slots.insert(
            at,
            Slot {
                offset,
                end,
                first: v.first,
                last: v.last,
            },
        );
        tops[a] = tops[a].max(end);
        placements[i] = Placement { arena: a, offset };
    }
    (placements, tops)
}

/// Check a layout of `iv`: one placement per interval, every interval with
/// `first <= last`, every placement aligned to `align` and inside its arena
/// (at its aligned size), `peak` the sum of the arena sizes, and no two
/// buffers live at a common step overlapping in the same arena.
///
/// Returns a message naming the first problem; for collisions, the first
/// pair `(i, j)`, `i < j`, in index order.
pub fn check(iv: &[Interval], align: u64, layout: &Layout) -> Result<(), String> {
    if !align.is_power_of_two() {
        return Err(format!("alignment {align} is not a power of two"));
    }
    if layout.placements.len() != iv.len() {
        return Err(format!(
            "layout has {} placements for {} intervals",
            layout.placements.len(),
            iv.len()
        ));
    }
    let sum = total(&layout.arenas).min(u64::MAX as u128);
    if sum != layout.peak as u128 {
        return Err(format!(
            "layout peak {} is not the sum of its arena sizes {sum}",
            layout.peak
        ));
    }
    let mut ends = Vec::with_capacity(iv.len());
    for (i, (v, p)) in iv.iter().zip(&layout.placements).enumerate() {
        if v.first > v.last {
            return Err(format!(
                "buffer {i} is last read at step {} before it is written at step {}",
                v.last, v.first
            ));
        }
        let Some(&arena) = layout.arenas.get(p.arena) else {
            return Err(format!(
                "buffer {i} is in arena {} but the layout has {} arenas",
                p.arena,
                layout.arenas.len()
            ));
        };
        if p.offset % align != 0 {
            return Err(format!(
                "buffer {i} is at offset {} in arena {}, not a multiple of the alignment {align}",
                p.offset, p.arena
            ));
        }
        let size = aligned_size(v.size, align);
        let end = p.offset as u128 + size as u128;
        if end > arena as u128 {
            return Err(format!(
                "buffer {i} ({size} bytes at offset {}) ends at {end}, past the end of arena {} \
                 ({arena} bytes)",
                p.offset, p.arena
            ));
        }
        ends.push(end as u64);
    }
    for i in 0..iv.len() {
        let (pi, ei) = (layout.placements[i], ends[i]);
        for j in i + 1..iv.len() {
            let (pj, ej) = (layout.placements[j], ends[j]);
            if pi.arena == pj.arena && pi.offset < ej && pj.offset < ei && iv[i].meets(&iv[j]) {
                return Err(format!(
                    "buffers {i} (steps {}..={}, bytes {}..{}) and {j} (steps {}..={}, bytes \
                     {}..{}) overlap in arena {} and are both live at step {}",
                    iv[i].first,
                    iv[i].last,
                    pi.offset,
                    ei,
                    iv[j].first,
                    iv[j].last,
                    pj.offset,
                    ej,
                    pi.arena,
                    iv[i].first.max(iv[j].first)
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_sizes() {
        assert_eq!(aligned_size(0, 256), 256);
        assert_eq!(aligned_size(1, 256), 256);
        assert_eq!(aligned_size(256, 256), 256);
        assert_eq!(aligned_size(257, 256), 512);
        assert_eq!(aligned_size(7, 0), 7);
        assert_eq!(aligned_size(u64::MAX, 256), u64::MAX / 256 * 256);
    }

    #[test]
    fn lower_bound_counts_shared_endpoints() {
        let iv = [
            Interval {
                size: 10,
                first: 0,
                last: 1,
            },
            Interval {
                size: 20,
                first: 1,
                last: 2,
            },
            Interval {
                size: 40,
                first: 3,
                last: 3,
            },
        ];
        // Step 1 holds the first two (aligned 16 + 32); step 3 holds 48.
        assert_eq!(lower_bound(&iv, 16), 48);
        assert_eq!(lower_bound(&iv, 1), 40);
        assert_eq!(lower_bound(&iv[..2], 1), 30);
        assert_eq!(lower_bound(&[], 256), 0);
    }
}
