// kiln lib needs: load_word
// Partial dot products of ROWS weight rows with one input row, dequantizing
// inside (DTYPE). Included once per weight of a matmul_vec kernel, each time
// under its own suffix. The including template defines ROWS, WG, lid_ (this
// invocation's index), X8 and x8(xo, e) (input elements e..e+8 of the row at
// xo) and x1(xo, e).
#include dequant.wgsl

// This invocation's share of Σ_k W[row r, k] · x[xo + k] for each r < ROWS;
// `rows` holds the rows' byte offsets. The caller reduces over the workgroup.
fn dot_rows(rows: array<u32, ROWS>, xo: u32, k: u32) -> array<f32, ROWS> {
    var acc: array<f32, ROWS>;
    let pieces = k / 8u;
    for (var i = lid_; i < pieces; i += WG) {
        let xv = x8(xo, i * 8u);
#if F16
        let ha = vec4<f16>(xv.a);
        let hb = vec4<f16>(xv.b);
#endif
        for (var r = 0u; r < ROWS; r++) {
            let v = deq8(rows[r], i * 8u);
#if F16
            acc[r] += f32(dot(vec4<f16>(v.a), ha)) + f32(dot(vec4<f16>(v.b), hb));
#else
            acc[r] += dot(v.a, xv.a) + dot(v.b, xv.b);
#endif
        }
    }
#if DTYPE == 'F32' || DTYPE == 'F16' || DTYPE == 'BF16'
    // Plain rows may end in a partial piece.
    for (var e = pieces * 8u + lid_; e < k; e += WG) {
        let xv = x1(xo, e);
        for (var r = 0u; r < ROWS; r++) {
#if F16
            acc[r] += f32(f16(deq1(rows[r], e)) * f16(xv));
#else
            acc[r] += deq1(rows[r], e) * xv;
#endif
        }
    }
#endif
    return acc;
}

// Byte offsets of rows n0 .. n0 + ROWS of a weight with `n` rows of `k`
// elements; rows past the end repeat the last (computed, never stored).
fn row_offsets(n0: u32, n: u32, k: u32) -> array<u32, ROWS> {
    var rows: array<u32, ROWS>;
    let rb = row_bytes(k);
    for (var r = 0u; r < ROWS; r++) {
        rows[r] = min(n0 + r, n - 1u) * rb;
    }
    return rows;
}
