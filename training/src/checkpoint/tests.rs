//! Checkpoints assembled byte by byte as `torch.save` writes them (the opcode sequence of a
//! real legacy file: GLOBAL, BINPERSID, `_rebuild_tensor_v2`, OrderedDict with BUILD), so the
//! readers are checked against exact expected values, including strided and offset views.

use super::*;

/// A tensor to write: values stored in a storage of `dtype`, seen through a view.
struct Spec {
    name: &'static str,
    storage_key: &'static str,
    dtype: &'static str,
    storage: Vec<u8>,
    numel: u64,
    offset: u64,
    size: Vec<u64>,
    stride: Vec<u64>,
}

fn unicode(out: &mut Vec<u8>, s: &str) {
    out.push(b'X');
    out.extend((s.len() as u32).to_le_bytes());
    out.extend(s.as_bytes());
}

fn int(out: &mut Vec<u8>, v: u64) {
    out.push(b'J');
    out.extend((v as u32).to_le_bytes());
}

fn ints(out: &mut Vec<u8>, v: &[u64]) {
    out.push(b'(');
    for &x in v {
        int(out, x);
    }
    out.push(b't');
}

/// The state-dict pickle: `OrderedDict` of `_rebuild_tensor_v2(...)` entries, with the
/// `_metadata` BUILD that real state dicts carry.
fn state_dict_pickle(specs: &[Spec]) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    p.extend(b"ccollections\nOrderedDict\nq\x00)R");
    p.push(b'(');
    for s in specs {
        unicode(&mut p, s.name);
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.extend(b"(");
        unicode(&mut p, "storage");
        p.extend(format!("ctorch\n{}\n", s.dtype).as_bytes());
        unicode(&mut p, s.storage_key);
        unicode(&mut p, "cpu");
        int(&mut p, s.numel);
        p.extend(b"NtQ");
        int(&mut p, s.offset);
        ints(&mut p, &s.size);
        ints(&mut p, &s.stride);
        p.push(0x89); // requires_grad False
        p.extend(b"h\x00)R"); // OrderedDict() backward hooks
        p.extend(b"tR");
    }
    p.push(b'u');
    p.extend(b"}b."); // BUILD with an (empty) metadata dict
    p
}

fn legacy_file(specs: &[Spec]) -> Vec<u8> {
    let mut f = vec![0x80, 2, 0x8a, 10];
    f.extend(LEGACY_MAGIC);
    f.push(b'.');
    f.extend(b"\x80\x02M\xe9\x03.");
    f.extend(b"\x80\x02}(X\r\x00\x00\x00little_endian\x88u.");
    f.extend(state_dict_pickle(specs));
    let mut keys: Vec<&str> = specs.iter().map(|s| s.storage_key).collect();
    keys.sort();
    keys.dedup();
    f.extend(b"\x80\x02](");
    for k in &keys {
        unicode(&mut f, k);
    }
    f.extend(b"e.");
    for k in keys {
        let s = specs.iter().find(|s| s.storage_key == k).unwrap();
        f.extend(s.numel.to_le_bytes());
        f.extend(&s.storage);
    }
    f
}

fn zip_file(specs: &[Spec]) -> Vec<u8> {
    use std::io::Write;
    let mut buf = Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        z.start_file("archive/data.pkl", opts).unwrap();
        z.write_all(&state_dict_pickle(specs)).unwrap();
        let mut done = Vec::new();
        for s in specs {
            if done.contains(&s.storage_key) {
                continue;
            }
            done.push(s.storage_key);
            z.start_file(format!("archive/data/{}", s.storage_key), opts)
                .unwrap();
            z.write_all(&s.storage).unwrap();
        }
        z.finish().unwrap();
    }
    buf.into_inner()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `a`: a [2, 3] f32 tensor seen transposed ([3, 2], strides [1, 3]) from element 2 of its
/// storage; `b`: f16 sharing nothing; `c`: i64 (`num_batches_tracked`, dropped);
/// `d`: a second view of `a`'s storage.
fn specs() -> Vec<Spec> {
    let storage: Vec<f32> = (0..8).map(|i| i as f32 * 1.5).collect();
    vec![
        Spec {
            name: "layer.weight",
            storage_key: "0",
            dtype: "FloatStorage",
            storage: f32_bytes(&storage),
            numel: 8,
            offset: 2,
            size: vec![3, 2],
            stride: vec![1, 3],
        },
        Spec {
            name: "layer.bias",
            storage_key: "1",
            dtype: "HalfStorage",
            storage: [0.5f32, -2.0, 1024.0]
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect(),
            numel: 3,
            offset: 0,
            size: vec![3],
            stride: vec![1],
        },
        Spec {
            name: "bn.num_batches_tracked",
            storage_key: "2",
            dtype: "LongStorage",
            storage: 7i64.to_le_bytes().to_vec(),
            numel: 1,
            offset: 0,
            size: vec![],
            stride: vec![],
        },
        Spec {
            name: "tail",
            storage_key: "0",
            dtype: "FloatStorage",
            storage: f32_bytes(&storage),
            numel: 8,
            offset: 6,
            size: vec![2],
            stride: vec![1],
        },
    ]
}

fn check(t: &BTreeMap<String, Tensor>) {
    assert_eq!(
        t.keys().collect::<Vec<_>>(),
        vec!["layer.bias", "layer.weight", "tail"]
    );
    // storage[2 + i + 3 j] for the [3, 2] view: rows (2, 5), (3, 6), (4, 7), times 1.5.
    let w: Vec<Vec<f32>> = t["layer.weight"].to_vec2().unwrap();
    assert_eq!(w, vec![vec![3.0, 7.5], vec![4.5, 9.0], vec![6.0, 10.5]]);
    let b: Vec<f32> = t["layer.bias"].to_vec1().unwrap();
    assert_eq!(b, vec![0.5, -2.0, 1024.0]);
    let tail: Vec<f32> = t["tail"].to_vec1().unwrap();
    assert_eq!(tail, vec![9.0, 10.5]);
}

#[test]
fn legacy_file_with_strides_offsets_and_dtypes() {
    let file = legacy_file(&specs());
    assert_eq!(sniff(&file), Some(FileKind::LegacyPickle));
    check(&read_bytes(&file, None).unwrap());
}

#[test]
fn zip_file_with_strides_offsets_and_dtypes() {
    let file = zip_file(&specs());
    assert_eq!(sniff(&file), Some(FileKind::Zip));
    check(&read_bytes(&file, None).unwrap());
}

#[test]
fn a_view_past_its_storage_is_refused() {
    let mut s = specs();
    s[0].offset = 3; // the last element would be storage[3 + 2 + 3] = storage[8], past the end
    for file in [legacy_file(&s), zip_file(&s)] {
        let err = read_bytes(&file, None).unwrap_err().to_string();
        assert!(
            err.contains("layer.weight") && err.contains("reaches element 8"),
            "{err}"
        );
    }
}

#[test]
fn a_global_outside_the_allow_list_is_refused_in_both_formats() {
    let mut s = specs();
    s[1].dtype = "FloatStorage\ncos\nsystem"; // smuggles `os.system` in as a GLOBAL
    s.truncate(2);
    for file in [legacy_file(&s), zip_file(&s)] {
        let err = read_bytes(&file, None).unwrap_err().to_string();
        assert!(err.contains("refused global"), "{err}");
    }
}

#[test]
fn every_truncation_and_many_mutations_are_errors_not_panics() {
    for file in [legacy_file(&specs()), zip_file(&specs())] {
        for n in 0..file.len() {
            let _ = read_bytes(&file[..n], None);
        }
        // Single-byte mutations at every position, three values each.
        for i in 0..file.len() {
            for v in [0u8, 0xff, file[i].wrapping_add(1)] {
                let mut m = file.clone();
                m[i] = v;
                let _ = read_bytes(&m, None);
            }
        }
    }
    assert!(read_bytes(&legacy_file(&specs())[..100], None).is_err());
}

#[test]
fn state_dict_under_a_key_and_module_prefixes() {
    let mut s = specs();
    s.truncate(2);
    for spec in &mut s {
        spec.name = if spec.name == "layer.weight" {
            "module.layer.weight"
        } else {
            "module.layer.bias"
        };
    }
    let t = read_bytes(&legacy_file(&s), None).unwrap();
    assert_eq!(
        t.keys().collect::<Vec<_>>(),
        vec!["layer.bias", "layer.weight"]
    );
    let err = read_bytes(&legacy_file(&s), Some("nope"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("under key `nope`"), "{err}");
}
