//! kiln's CPU dequantization against vectors made by the `gguf` Python package
//! (tools/gen_dequant_vectors.py documents the file layout and how to remake them).
//! Every value must match bit for bit, NaN payloads included.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use kiln::model::dequant::{self, DequantError};
use kiln::model::dtype::DType;

const MAGIC: &[u8; 4] = b"KDQ1";

/// The types kiln promises to dequantize; each must have a vector file.
const EXPECTED: [DType; 14] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::Q4_0,
    DType::Q4_1,
    DType::Q5_0,
    DType::Q5_1,
    DType::Q8_0,
    DType::Q2_K,
    DType::Q3_K,
    DType::Q4_K,
    DType::Q5_K,
    DType::Q6_K,
    DType::IQ4_NL,
];

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dequant")
}

/// One vector file: the dtype, its raw block bytes and the expected values.
struct Vector {
    dtype: DType,
    raw: Vec<u8>,
    expected: Vec<f32>,
}

fn u32_at(buf: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(buf[off..off + 4].try_into().expect("4 bytes"))
}

fn read_vector(path: &Path) -> Vector {
    let buf = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        buf.len() >= 16 && &buf[..4] == MAGIC,
        "{}: bad header",
        path.display()
    );
    let id = u32_at(&buf, 4);
    let dtype = DType::from_id(id).unwrap_or_else(|| panic!("{}: unknown id {id}", path.display()));
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    assert_eq!(
        dtype.to_string(),
        stem,
        "{}: id names {dtype}",
        path.display()
    );
    let n_elems = u32_at(&buf, 8) as usize;
    let n_bytes = u32_at(&buf, 12) as usize;
    assert_eq!(
        buf.len(),
        16 + n_bytes + 4 * n_elems,
        "{}: size",
        path.display()
    );
    let raw = buf[16..16 + n_bytes].to_vec();
    let expected = buf[16 + n_bytes..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    Vector {
        dtype,
        raw,
        expected,
    }
}

#[test]
fn dequant_matches_gguf_py_bit_for_bit() {
    let mut seen = BTreeSet::new();
    let mut entries: Vec<PathBuf> = std::fs::read_dir(data_dir())
        .expect("tests/data/dequant exists (run tools/gen_dequant_vectors.py)")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    entries.sort();
    for path in &entries {
        let v = read_vector(path);
        let got = dequant::dequantize(v.dtype, &v.raw, v.expected.len())
            .unwrap_or_else(|e| panic!("{}: {e}", v.dtype));
        let mut mismatches = 0usize;
        for (i, (g, e)) in got.iter().zip(&v.expected).enumerate() {
            if g.to_bits() != e.to_bits() {
                if mismatches < 10 {
                    let block = i / v.dtype.block_size();
                    eprintln!(
                        "{} elem {i} (block {block}): got {g:e} ({:#010x}), want {e:e} ({:#010x})",
                        v.dtype,
                        g.to_bits(),
                        e.to_bits()
                    );
                }
                mismatches += 1;
            }
        }
        assert_eq!(
            mismatches,
            0,
            "{}: {mismatches} of {} values differ",
            v.dtype,
            got.len()
        );

        // dequantize_into over a pre-filled buffer gives the same bits.
        let mut out = vec![f32::from_bits(0x7fc0_dead); v.expected.len()];
        dequant::dequantize_into(v.dtype, &v.raw, &mut out).expect("same input");
        assert!(
            out.iter()
                .zip(&got)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{}",
            v.dtype
        );

        assert!(seen.insert(v.dtype), "{}: two files", v.dtype);
    }
    let missing: Vec<_> = EXPECTED.iter().filter(|d| !seen.contains(*d)).collect();
    assert!(missing.is_empty(), "no vector file for {missing:?}");
    // Every type kiln calls supported is covered (and nothing else).
    let supported: BTreeSet<DType> = DType::supported().collect();
    assert_eq!(supported, EXPECTED.into_iter().collect::<BTreeSet<_>>());
}

#[test]
fn wrong_lengths_are_errors() {
    for dtype in EXPECTED {
        let (bs, ts) = (dtype.block_size(), dtype.type_size());
        let bytes = vec![0u8; 2 * ts + 1];
        // One byte too many and one too few.
        for n_bytes in [2 * ts + 1, 2 * ts - 1, 0] {
            let err = dequant::dequantize(dtype, &bytes[..n_bytes], 2 * bs).unwrap_err();
            assert!(
                matches!(err, DequantError::WrongLength { .. }),
                "{dtype}: {err}"
            );
            let msg = err.to_string();
            assert!(msg.contains(&dtype.to_string()), "{msg}");
            assert!(
                msg.contains(&(2 * ts).to_string()) && msg.contains(&n_bytes.to_string()),
                "{msg}"
            );
        }
        // A partial block.
        if bs > 1 {
            let err = dequant::dequantize(dtype, &bytes[..ts], bs - 1).unwrap_err();
            assert!(
                matches!(err, DequantError::PartialBlock { .. }),
                "{dtype}: {err}"
            );
            let mut out = vec![0.0; bs + 1];
            let err = dequant::dequantize_into(dtype, &bytes[..2 * ts], &mut out).unwrap_err();
            assert!(
                matches!(err, DequantError::PartialBlock { .. }),
                "{dtype}: {err}"
            );
        }
        // Output buffer too small for the bytes.
        let mut out = vec![0.0; bs];
        assert!(dequant::dequantize_into(dtype, &bytes[..2 * ts], &mut out).is_err());
        // An absurd element count is an error, not an allocation.
        let n = usize::MAX - usize::MAX % bs;
        assert!(dequant::dequantize(dtype, &bytes[..ts], n).is_err());
        // Zero elements from zero bytes is fine.
        assert_eq!(
            dequant::dequantize(dtype, &[], 0).expect("empty"),
            Vec::<f32>::new()
        );
    }
}

#[test]
fn unsupported_dtypes_are_errors() {
    let unsupported = [
        DType::Q8_1,
        DType::Q8_K,
        DType::IQ2_XXS,
        DType::IQ4_XS,
        DType::I8,
        DType::I32,
        DType::F64,
        DType::TQ2_0,
    ];
    for dtype in unsupported {
        let bytes = vec![0u8; dtype.type_size()];
        let err = dequant::dequantize(dtype, &bytes, dtype.block_size()).unwrap_err();
        assert!(
            matches!(err, DequantError::Unsupported { dtype: d } if d == dtype),
            "{err}"
        );
        assert!(err.to_string().contains(&dtype.to_string()), "{err}");
        let mut out = vec![0.0; dtype.block_size()];
        assert!(dequant::dequantize_into(dtype, &bytes, &mut out).is_err());
    }
}
