//! `record_format: legacy` against the tool it replaces: every document here is serialized to
//! BSON, decoded and dumped by pymongo 3's `bson.json_util.dumps` (tests/support/legacy_dumps.py
//! in `.venv-pymongo3`, made by `scripts/test-setup`; `MW_PYMONGO3_PYTHON` names another
//! interpreter), and `encode(.., RecordFormat::Legacy)` must give the same bytes.
//!
//! Known differences, where pymongo 3 cannot decode the value at all (so the old tool failed
//! on such an event and had no output to match), are checked in
//! `values_pymongo3_cannot_decode`: dates outside years 1 to 9999, UUID-subtype binaries that
//! are not 16 bytes, and embedded `$ref` documents whose `$ref` is not a string or whose `$db`
//! is neither a string nor null.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use bson::spec::BinarySubtype;
use bson::{
    doc, oid::ObjectId, Binary, Bson, DateTime, Decimal128, Document, JavaScriptCodeWithScope,
    Regex, Timestamp,
};
use watchers::record::{encode, RecordFormat};

fn pymongo3_python() -> PathBuf {
    match std::env::var_os("MW_PYMONGO3_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv-pymongo3/bin/python"),
    }
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            s.push(if i <= chunk.len() {
                char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize])
            } else {
                '='
            });
        }
    }
    s
}

/// One output line per document: pymongo 3's dumps, or `!ERROR ...` where it cannot decode.
fn pymongo3_dumps(docs: &[Document]) -> Vec<String> {
    let python = pymongo3_python();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/legacy_dumps.py");
    let mut child = Command::new(&python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "start {} (run scripts/test-setup first): {e}",
                python.display()
            )
        });
    let input: String = docs
        .iter()
        .map(|d| base64(&bson::serialize_to_vec(d).expect("serializable document")) + "\n")
        .collect();
    let mut stdin = child.stdin.take().expect("piped stdin");
    // A thread writes while we read, so that neither side blocks on a full pipe.
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let stdout = child.stdout.take().expect("piped stdout");
    let lines: Vec<String> = BufReader::new(stdout)
        .lines()
        .map(|l| l.expect("utf-8 line from legacy_dumps.py"))
        .collect();
    writer
        .join()
        .expect("writer thread")
        .expect("write to legacy_dumps.py");
    let status = child.wait().expect("wait for legacy_dumps.py");
    assert!(status.success(), "legacy_dumps.py failed: {status}");
    assert_eq!(lines.len(), docs.len(), "one output line per document");
    lines
}

/// Asserts byte equality for every document, listing every mismatch before failing.
fn assert_same_as_pymongo3(docs: &[Document]) {
    let expected = pymongo3_dumps(docs);
    let mut mismatches = 0;
    for (doc, want) in docs.iter().zip(&expected) {
        let got = String::from_utf8_lossy(&encode(doc, RecordFormat::Legacy)).into_owned();
        if &got != want {
            mismatches += 1;
            eprintln!("MISMATCH for {doc:?}\n  pymongo 3: {want}\n  legacy:    {got}\n");
        }
    }
    assert_eq!(
        mismatches,
        0,
        "{mismatches} of {} documents differ",
        docs.len()
    );
}

fn bin(subtype: u8, bytes: &[u8]) -> Bson {
    Bson::Binary(Binary {
        subtype: BinarySubtype::from(subtype),
        bytes: bytes.to_vec(),
    })
}

fn regex(pattern: &str, options: &str) -> Bson {
    Bson::RegularExpression(Regex {
        pattern: pattern.try_into().expect("pattern without NUL"),
        options: options.try_into().expect("options without NUL"),
    })
}

fn decimal(s: &str) -> Bson {
    Bson::Decimal128(s.parse::<Decimal128>().expect("valid decimal"))
}

fn oid(hex: &str) -> ObjectId {
    ObjectId::parse_str(hex).expect("valid ObjectId")
}

/// xorshift64*: deterministic values, so that a failure repeats.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// A full document with most BSON types, as the old tool's events carried them.
fn full_document() -> Document {
    doc! {
        "_id": oid("65a1b2c3d4e5f60718293a4b"),
        "name": "Zoë Ångström",
        "city": "日本",
        "mood": "😀🎉",
        "count": 42,
        "big": 9_007_199_254_740_993_i64,
        "negative": -7_i64,
        "price": 1.5,
        "ratio": 1.0,
        "huge": 1e16,
        "tiny": 1e-7,
        "nz": -0.0,
        "nan": f64::NAN,
        "inf": f64::INFINITY,
        "ninf": f64::NEG_INFINITY,
        "amount": decimal("1234.5600"),
        "created": DateTime::from_millis(1_704_164_645_678),
        "born": DateTime::from_millis(-1_234_567_890_123),
        "epoch": DateTime::from_millis(0),
        "blob": bin(0, b"\x00\x01\x02\xff"),
        "uuid": bin(4, &[0x5f, 0x2a, 0x1c, 0x3d, 0x4e, 0x5f, 0x40, 0x71, 0x82, 0x93, 0xa4, 0xb5, 0xc6, 0xd7, 0xe8, 0xf9]),
        "old_uuid": bin(3, b"0123456789abcdef"),
        "custom": bin(0x80, b"user defined"),
        "ts": Timestamp { time: 1_700_000_000, increment: 3 },
        "pattern": regex("^ab+c$", "im"),
        "nothing": Bson::Null,
        "yes": true,
        "no": false,
        "tags": ["a", 1, 2.5, Bson::Null, ["nested", ["deeper"]], {"k": "v"}],
        "address": {"street": "1 Rue de l'Église", "geo": {"lat": 48.8566, "lng": 2.3522}},
        "empty_doc": {},
        "empty_arr": [],
        "min": Bson::MinKey,
        "max": Bson::MaxKey,
        "code": Bson::JavaScriptCode("function () { return 1; }".into()),
    }
}

#[test]
fn change_events_match_pymongo3() {
    let key = oid("65a1b2c3d4e5f60718293a4b");
    let ns = doc! {"db": "shop", "coll": "orders"};
    let resume =
        "8265A1B2C3000000012B022C0100296E5A1004B8E3A1C2D4E5F60718293A4B5C6D7E8F46645F69640064";
    let insert = doc! {
        "_id": {"_data": resume},
        "operationType": "insert",
        "clusterTime": Timestamp { time: 1_705_096_899, increment: 1 },
        "wallTime": DateTime::from_millis(1_705_096_899_123),
        "fullDocument": full_document(),
        "ns": ns.clone(),
        "documentKey": {"_id": key},
    };
    let update = doc! {
        "_id": {"_data": resume},
        "operationType": "update",
        "clusterTime": Timestamp { time: 1_705_096_900, increment: 4_294_967_295_u32 },
        "ns": ns.clone(),
        "documentKey": {"_id": key},
        "updateDescription": {
            "updatedFields": {"count": 43, "address.city": "Zürich", "price": 2.0},
            "removedFields": ["tiny"],
            "truncatedArrays": [{"field": "tags", "newSize": 2}],
        },
        "fullDocument": Bson::Null,
    };
    let delete = doc! {
        "_id": {"_data": resume},
        "operationType": "delete",
        "clusterTime": Timestamp { time: 0, increment: 0 },
        "ns": ns.clone(),
        "documentKey": {"_id": "string-key-é"},
    };
    let drop = doc! {
        "_id": {"_data": resume},
        "operationType": "drop",
        "clusterTime": Timestamp { time: u32::MAX, increment: 1 },
        "ns": ns,
    };
    assert_same_as_pymongo3(&[insert, update, delete, drop]);
}

#[test]
fn scalars_match_pymongo3() {
    let dates = [
        0,
        1,
        -1,
        999,
        -999,
        1000,
        -1000,
        -1001,
        86_399_999,
        -86_400_000,
        -2_208_988_800_000,  // 1900-01-01
        -62_135_596_800_000, // 0001-01-01, the earliest datetime
        253_402_300_799_999, // 9999-12-31T23:59:59.999, the latest
        1_705_096_899_123,
        4_102_444_800_000, // 2100-01-01
    ];
    let doubles = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        1.5,
        0.1,
        0.30000000000000004,
        100.0,
        1e15,
        1e16,
        1.5e16,
        123_456_789_012_345_680.0,
        1e22,
        1e-4,
        1e-5,
        1.5e-5,
        1e-7,
        1.5e-7,
        2.5e-300,
        5e-324,
        f64::MIN_POSITIVE,
        f64::MAX,
        f64::MIN,
        f64::EPSILON,
        std::f64::consts::PI,
        f64::NAN,
        -f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
    ];
    let decimals = [
        "0",
        "-0",
        "1",
        "-1",
        "1.50",
        "0.001",
        "0.0000001",
        "1E+3",
        "1E-7",
        "123.456E+10",
        "-0.000",
        "0E+3",
        "0E-10",
        "1E+6144",
        "1E-6176",
        "9999999999999999999999999999999999",
        "1234567890123456789012345678901234E-20",
        "NaN",
        "-NaN",
        "Infinity",
        "-Infinity",
    ];
    let mut docs = vec![
        doc! {"dates": dates.iter().map(|&ms| Bson::DateTime(DateTime::from_millis(ms))).collect::<Vec<_>>()},
        doc! {"doubles": doubles.to_vec()},
        doc! {"decimals": decimals.iter().map(|s| decimal(s)).collect::<Vec<_>>()},
        doc! {
            "i32": [0, 1, -1, i32::MAX, i32::MIN],
            "i64": [0_i64, -1_i64, 9_007_199_254_740_993_i64, i64::MAX, i64::MIN],
        },
        doc! {
            "ts": [
                Timestamp { time: 0, increment: 0 },
                Timestamp { time: u32::MAX, increment: u32::MAX },
                Timestamp { time: 1_705_096_899, increment: 17 },
            ],
        },
        doc! {"oids": [oid("000000000000000000000000"), oid("ffffffffffffffffffffffff"), oid("65A1B2C3D4E5F60718293A4B")]},
        doc! {"null": Bson::Null, "t": true, "f": false, "min": Bson::MinKey, "max": Bson::MaxKey},
        doc! {
            "regexes": [
                regex("", ""),
                regex("^a.b$", "i"),
                regex("x", "imsux"),
                regex("x", "l"),
                regex("é日本\\d+\"/", "ms"),
                regex("x", "ag"),
            ],
        },
        doc! {
            "code": Bson::JavaScriptCode("function () { return \"é\"; }".into()),
            "with_scope": Bson::JavaScriptCodeWithScope(JavaScriptCodeWithScope {
                code: "function () { return x; }".into(),
                scope: doc! {"x": 1, "y": {"z": [1.0]}},
            }),
            "empty_scope": Bson::JavaScriptCodeWithScope(JavaScriptCodeWithScope {
                code: String::new(),
                scope: Document::new(),
            }),
        },
    ];
    // Binaries: every subtype family, lengths around the base64 padding and the UUID size.
    for subtype in [0u8, 1, 2, 3, 4, 5, 6, 7, 8, 0x20, 0x80, 0xff] {
        let lengths: &[usize] = if matches!(subtype, 3 | 4) {
            &[16]
        } else {
            &[0, 1, 2, 3, 16, 17, 100]
        };
        let values: Vec<Bson> = lengths
            .iter()
            .map(|&n| {
                bin(
                    subtype,
                    &(0..n).map(|i| (i * 37 + 11) as u8).collect::<Vec<_>>(),
                )
            })
            .collect();
        docs.push(doc! {"subtype": i32::from(subtype), "values": values});
    }
    assert_same_as_pymongo3(&docs);
}

#[test]
fn strings_and_structure_match_pymongo3() {
    let every_ascii: String = (0u8..=0x7f).map(char::from).collect();
    let docs = vec![
        doc! {"s": every_ascii},
        doc! {"s": "é", "t": "日本", "u": "😀", "v": "\u{ffff}\u{10000}\u{10ffff}\u{2028}\u{feff}"},
        doc! {"clé": 1, "日本": {"😀": [1]}, "": "", "a\"b\\c\n": "d"},
        doc! {"z": 1, "a": 2, "m": {"z": 1, "a": 2}},
        doc! {"nested": [[[[]]], [{}], [{"a": [{"b": [1, [2, [3]]]}]}]]},
        doc! {"_id": {"_data": "82", "extra": [Bson::Null]}},
        Document::new(),
        doc! {
            "sym": Bson::Symbol("symbol é".into()),
            "undef": Bson::Undefined,
            "ptr": Bson::try_from(serde_json::json!({
                "$dbPointer": {"$ref": "db.coll", "$id": {"$oid": "65a1b2c3d4e5f60718293a4b"}}
            }))
            .expect("DBPointer from Extended JSON"),
        },
        // pymongo 3 decodes embedded documents with a `$ref` key into DBRefs.
        doc! {
            "$ref": "top-level stays a dict",
            "$id": 1,
            "r1": {"$id": 1, "x": 2, "$ref": "c"},
            "r2": {"x": 2, "$ref": "c", "$db": "d"},
            "r3": [{"$db": Bson::Null, "$ref": "c"}, {"$ref": Bson::Symbol("s".into()), "$db": Bson::Undefined}],
            "r4": {"$ref": "c", "$id": oid("65a1b2c3d4e5f60718293a4b"), "$db": "d", "more": {"$ref": "e"}},
            "r5": {"a": {"$id": {"$ref": "inner", "$id": 2}, "$ref": "outer"}},
        },
        // A code scope is never made a DBRef itself by pymongo 3's C decoder (the one its
        // wheels ship); its pure-Python fallback refuses this document instead.
        doc! {
            "scope": Bson::JavaScriptCodeWithScope(JavaScriptCodeWithScope {
                code: "f".into(),
                scope: doc! {"$id": 1, "$ref": "c", "in": {"$ref": "d"}},
            }),
        },
    ];
    assert_same_as_pymongo3(&docs);
}

/// Random doubles and decimals against Python's `repr` and `Decimal.__str__`.
#[test]
fn random_numbers_match_pymongo3() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut docs = Vec::new();
    for _ in 0..8 {
        // Any bit pattern: subnormals, huge and tiny exponents, NaN payloads.
        let raw: Vec<f64> = (0..250).map(|_| f64::from_bits(rng.next())).collect();
        // Short decimal-looking values, where positional and exponent forms meet.
        let short: Vec<f64> = (0..250)
            .map(|_| {
                let mantissa = (rng.next() % 100_000) as f64;
                let exp = (rng.next() % 50) as i32 - 25;
                mantissa * 10f64.powi(exp)
            })
            .collect();
        // Canonical Decimal128: coefficient below 10^34, any exponent, either sign.
        let decimals: Vec<Bson> = (0..250)
            .map(|_| {
                let digits = rng.next() % 35;
                let coefficient = (u128::from(rng.next()) << 64 | u128::from(rng.next()))
                    % 10u128.pow(digits as u32);
                let exponent = (rng.next() % 12_288) as u128; // biased, 0..=12287
                let sign = u128::from(rng.next() & 1);
                let bits = sign << 127 | exponent << 113 | coefficient;
                Bson::Decimal128(Decimal128::from_bytes(bits.to_le_bytes()))
            })
            .collect();
        docs.push(doc! {"raw": raw, "short": short, "decimals": decimals});
    }
    assert_same_as_pymongo3(&docs);
}

/// Values pymongo 3 refuses to decode: the old tool failed on such events, so there is no
/// output to match. Checks that this is still so and shows what the legacy format writes.
#[test]
fn values_pymongo3_cannot_decode() {
    let cases = [
        (
            doc! {"d": DateTime::from_millis(253_402_300_800_000)},
            r#"{"d": {"$date": 253402300800000}}"#,
        ),
        (
            doc! {"d": DateTime::from_millis(-62_135_596_800_001)},
            r#"{"d": {"$date": -62135596800001}}"#,
        ),
        (
            doc! {"u": bin(4, b"short")},
            r#"{"u": {"$binary": "c2hvcnQ=", "$type": "04"}}"#,
        ),
        (
            doc! {"u": bin(3, &[0; 17])},
            r#"{"u": {"$binary": "AAAAAAAAAAAAAAAAAAAAAAA=", "$type": "03"}}"#,
        ),
        (
            doc! {"r": {"$ref": 5, "$id": 1}},
            r#"{"r": {"$ref": 5, "$id": 1}}"#,
        ),
        (
            doc! {"r": {"$ref": "c", "$db": 1}},
            r#"{"r": {"$ref": "c", "$db": 1}}"#,
        ),
    ];
    let docs: Vec<Document> = cases.iter().map(|(d, _)| d.clone()).collect();
    for ((doc, ours), theirs) in cases.iter().zip(pymongo3_dumps(&docs)) {
        assert!(
            theirs.starts_with("!ERROR"),
            "pymongo 3 now decodes {doc:?} as {theirs}; compare it with the legacy format"
        );
        assert_eq!(
            String::from_utf8_lossy(&encode(doc, RecordFormat::Legacy)),
            *ours
        );
    }
}
