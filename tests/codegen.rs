//! Every variant every template can produce, for each feature set, is
//! generated and validated by naga — not only the ones a plan picks.

use kiln::codegen::{self, variant_name, Caps};

/// lavapipe's limits (the tightest kiln meets in CI): 32 KiB workgroup
/// storage, 1024 invocations.
const MAX_INVOCATIONS: u32 = 1024;
const MAX_WG_STORAGE: u32 = 32 * 1024;

#[test]
fn every_variant_validates_in_every_feature_set() {
    let mut count = 0;
    for t in codegen::templates().unwrap() {
        for caps in Caps::feature_sets(MAX_INVOCATIONS, MAX_WG_STORAGE) {
            let variants = t.variants(&caps).unwrap();
            assert!(
                !variants.is_empty(),
                "{} has no variant for {caps:?}",
                t.name
            );
            for k in variants {
                // A variant never needs more than the feature set gives.
                assert!(caps.subgroups || k.get("SUBGROUPS").is_none_or(|v| v == "0"));
                assert!(caps.f16 || k.get("F16").is_none_or(|v| v == "0"));
                t.build(&k, &caps).unwrap_or_else(|e| panic!("{e}"));
                count += 1;
            }
        }
    }
    assert!(count >= 8, "only {count} variants");
}

#[test]
fn limits_remove_variants() {
    let t = codegen::template("rms_norm").unwrap();
    let small = Caps {
        f16: false,
        subgroups: false,
        max_invocations: 64,
        max_wg_storage: 1024,
    };
    let v = t.variants(&small).unwrap();
    assert_eq!(v.len(), 1);
    assert_eq!(variant_name(&t.name, &v[0]), "rms_norm.subgroups0.wg64");
}

#[test]
fn errors_name_template_knobs_and_line() {
    let t = codegen::Template::parse(
        "bad.wgsl",
        "//! kiln template: bad\n//! knob WG: 64\n@compute @workgroup_size({{WG}})\nfn main() { let x: f32 = 1u; }\n",
    )
    .unwrap();
    let caps = Caps::feature_sets(1024, 32768)[0];
    let k = t.variants(&caps).unwrap().remove(0);
    let e = t.build(&k, &caps).unwrap_err().to_string();
    assert!(e.contains("bad") && e.contains("WG=64"), "{e}");
    assert!(e.contains("let x: f32 = 1u;"), "{e}");
    let t2 =
        codegen::Template::parse("u.wgsl", "//! kiln template: u\nfn f() { {{NOPE}} }\n").unwrap();
    let e2 = t2.generate(&Default::default()).unwrap_err().to_string();
    assert!(e2.contains("unknown placeholder {{NOPE}}"), "{e2}");
}

#[test]
fn generated_wgsl_snapshot() {
    let t = codegen::template("rms_norm").unwrap();
    for sg in ["0", "1"] {
        let k = [
            ("WG".to_string(), "128".to_string()),
            ("SUBGROUPS".to_string(), sg.to_string()),
        ]
        .into_iter()
        .collect();
        insta::assert_snapshot!(format!("rms_norm_sg{sg}"), t.generate(&k).unwrap());
    }
}
