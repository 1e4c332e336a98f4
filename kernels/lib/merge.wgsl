// The merge of split-K decode attention (attention.wgsl, SPLIT > 1): a
// head's MERGE_S partial rows [m, l, acc[0..Dv]], `row` (Dv + 2) words
// apart from word hb, give out[d] = Σ_s e^(m_s - M) acc_s[d] / Σ_s
// e^(m_s - M) l_s with M = max_s m_s. An empty split (m = -3e38, l = 0)
// weighs nothing and its accumulators are not read, so a short context
// (few splits with keys) reads few rows. The includer defines the
// constant MERGE_S (so the loops over the splits unroll and their loads
// are in flight together) and fn part_ld(i: u32) -> f32.
// (Counting the splits with keys from the position instead, so that the
// accumulator loads need not wait for the maxima, measured the same on
// the H100: docs/PERF.md, stop 17.)

// Each split's weight e^(m_s - M) / Σ_s e^(m_s - M) l_s; 0 for an empty one.
fn merge_weights(hb: u32, row: u32) -> array<f32, MERGE_S> {
    var ms: array<f32, MERGE_S>;
    var ls: array<f32, MERGE_S>;
    var mx = -3.0e38;
    for (var s = 0u; s < MERGE_S; s++) {
        ms[s] = part_ld(hb + s * row);
        ls[s] = part_ld(hb + s * row + 1u);
        mx = max(mx, ms[s]);
    }
    var w: array<f32, MERGE_S>;
    var den = 0.0;
    for (var s = 0u; s < MERGE_S; s++) {
        w[s] = select(0.0, exp(ms[s] - mx), ms[s] > -1.0e38);
        den += w[s] * ls[s];
    }
    let inv = 1.0 / den;
    for (var s = 0u; s < MERGE_S; s++) {
        w[s] *= inv;
    }
    return w;
}

// Element d of the merged head row, with its merge_weights w.
fn merge1(w: array<f32, MERGE_S>, hb: u32, row: u32, d: u32) -> f32 {
    var acc = 0.0;
    for (var s = 0u; s < MERGE_S; s++) {
        if w[s] > 0.0 {
            acc += w[s] * part_ld(hb + s * row + 2u + d);
        }
    }
    return acc;
}

// Elements d..d+4 of the merged head row (d + 4 <= Dv).
fn merge4(w: array<f32, MERGE_S>, hb: u32, row: u32, d: u32) -> vec4<f32> {
    var acc = vec4<f32>(0.0);
    for (var s = 0u; s < MERGE_S; s++) {
        if w[s] > 0.0 {
            let r = hb + s * row + 2u + d;
            acc += w[s] * vec4<f32>(part_ld(r), part_ld(r + 1u), part_ld(r + 2u), part_ld(r + 3u));
        }
    }
    return acc;
}
