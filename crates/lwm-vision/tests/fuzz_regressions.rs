//! Inputs that crashed, hung or exhausted memory in the VQGAN pickle reader (found by
//! `fuzz/fuzz_targets/vqgan_pickle.rs`, see docs/fuzz.md): each is now one clean error.

use lwm_vision::vqgan::pickle::load_arrays;

fn err(bytes: &[u8]) -> String {
    format!("{:#}", load_arrays(bytes).unwrap_err())
}

#[test]
fn huge_length_prefix_is_truncation_not_overflow() {
    // BINBYTES8 with a length of u64::MAX: `pos + n` overflowed.
    let e = err(b"\x80\x04\x8e\xff\xff\xff\xff\xff\xff\xff\xff");
    assert!(e.contains("pickle is truncated"), "{e}");
}

#[test]
fn dict_containing_itself_is_refused() {
    // d = {}; d['a'] = d — flatten recursed until the stack overflowed (and the Rc cycle
    // leaked).
    let e = err(b"\x80\x02}q\x00X\x01\x00\x00\x00ah\x00s.");
    assert!(e.contains("more than 64 deep"), "{e}");
}

#[test]
fn deep_nesting_neither_overflows_the_stack_nor_is_accepted() {
    // None wrapped in a million 1-tuples: dropping the tree recursed a million deep.
    let mut p = b"\x80\x02N".to_vec();
    p.extend(std::iter::repeat_n(0x85u8, 1_000_000));
    p.push(b'.');
    let e = err(&p);
    assert!(e.contains("more than 64 deep"), "{e}");
}

/// `numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')` then BUILD with the given
/// shape tuple (already pickled) and `raw` as data, protocol 2, memoized at 0.
fn array_pickle(shape: &[u8], raw: &[u8]) -> Vec<u8> {
    let mut p =
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R"
            .to_vec();
    p.extend_from_slice(b"q\x00(K\x01");
    p.extend_from_slice(shape);
    p.extend_from_slice(b"cnumpy\ndtype\nU\x02f4K\x00K\x01\x87R(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89");
    p.push(b'C');
    p.push(raw.len() as u8);
    p.extend_from_slice(raw);
    p.extend_from_slice(b"tb");
    p
}

#[test]
fn array_fixture_builder_is_valid() {
    let mut p = array_pickle(b"K\x02\x85", &[0, 0, 128, 63, 0, 0, 0, 64]);
    p.extend_from_slice(b"\x85.");
    let a = load_arrays(&p).unwrap();
    assert_eq!(a["0"].shape, vec![2]);
    assert_eq!(a["0"].data, vec![1.0, 2.0]);
}

#[test]
fn shape_whose_size_overflows_is_refused() {
    // shape (2**62, 8): the element count times 4 wrapped to 0 and matched empty data.
    let shape = b"\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x40K\x08\x86";
    let mut p = array_pickle(shape, b"");
    p.extend_from_slice(b"\x85.");
    let e = err(&p);
    assert!(e.contains("is too large"), "{e}");
}

#[test]
fn shared_array_referenced_many_times_is_bounded() {
    // One 64-byte array memoized and referenced 100 times inside a tuple: each reference
    // was a copy (a few MB of pickle could ask for terabytes).
    let mut p = array_pickle(b"K\x10\x85", &[0u8; 64]);
    p.push(b'(');
    p.extend(std::iter::repeat_n(*b"h\x00", 100).flatten());
    p.extend_from_slice(b"t.");
    let e = err(&p);
    assert!(e.contains("more often than its size allows"), "{e}");
}

#[test]
fn a_list_holding_itself_under_a_reused_memo_slot_is_one_clean_error() {
    // A list memoized, appended into itself through the memo, then its memo slot reused
    // (LONG_BINPUT to the same index): the memo no longer named it when dropped, so its Rc
    // cycle leaked (found by the fuzzer under ASan). Here: one clean error, no panic; the
    // leak itself is ASan's to see (`scripts/fuzz.sh` on fuzz/found/).
    let bytes = include_bytes!("../../../fuzz/found/vqgan_pickle-leak-self-list");
    assert!(load_arrays(bytes).is_err());
}
