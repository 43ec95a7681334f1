//! A restricted pickle reader for the original VQGAN weights: a nested dict of numpy float32
//! arrays (`pickle.dump(params)` of flax params, protocol 2-4).
//!
//! Nothing is ever executed. The only globals accepted are numpy's array reconstructor
//! (`numpy.core.multiarray._reconstruct`, or `numpy._core...` from numpy 2), `numpy.ndarray`
//! and `numpy.dtype`; REDUCE is only applied to those two callables, with the exact argument
//! shapes numpy writes, and BUILD only to their results. Any other opcode or global is an
//! error naming it.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::rc::Rc;

/// A float32 array from the pickle, row-major.
#[derive(Debug, Clone)]
pub struct NdArray {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Global {
    Reconstruct,
    NdArray,
    DType,
}

#[derive(Debug)]
enum Val {
    Mark,
    None,
    Bool(bool),
    Int(i64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Rc<Val>>),
    List(std::cell::RefCell<Vec<Rc<Val>>>),
    Dict(std::cell::RefCell<Vec<(Rc<Val>, Rc<Val>)>>),
    Global(Global),
    /// `dtype('f4', ...)` before and after its BUILD (the state only confirms byte order).
    DType(String, std::cell::Cell<bool>),
    /// `_reconstruct(ndarray, (0,), b'b')` awaiting BUILD, then the array.
    Array(std::cell::RefCell<Option<NdArray>>),
}

fn kind(v: &Val) -> &'static str {
    match v {
        Val::Mark => "mark",
        Val::None => "None",
        Val::Bool(_) => "bool",
        Val::Int(_) => "int",
        Val::Str(_) => "str",
        Val::Bytes(_) => "bytes",
        Val::Tuple(_) => "tuple",
        Val::List(_) => "list",
        Val::Dict(_) => "dict",
        Val::Global(_) => "global",
        Val::DType(..) => "dtype",
        Val::Array(_) => "ndarray",
    }
}

struct Pickle<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Pickle<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.data.len() - self.pos {
            bail!(
                "pickle is truncated: {n} bytes wanted at offset {} of {}",
                self.pos,
                self.data.len()
            );
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn le(&mut self, n: usize) -> Result<u64> {
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(self.take(n)?);
        Ok(u64::from_le_bytes(b))
    }
    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .context("pickle is truncated inside a GLOBAL")?;
        self.pos += end + 1;
        Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
    }
}

fn resolve_global(module: &str, name: &str) -> Result<Global> {
    Ok(match (module, name) {
        ("numpy.core.multiarray" | "numpy._core.multiarray", "_reconstruct") => {
            Global::Reconstruct
        }
        ("numpy", "ndarray") => Global::NdArray,
        ("numpy", "dtype") => Global::DType,
        _ => bail!(
            "pickle refers to '{module}.{name}', which is not allowed: only numpy float32 arrays in dicts/tuples are accepted (nothing in a pickle is ever executed)"
        ),
    })
}

fn as_usize(v: &Val) -> Option<usize> {
    match v {
        Val::Int(i) if *i >= 0 => Some(*i as usize),
        _ => None,
    }
}

/// `_reconstruct(ndarray, (0,), b'b')` -> an array stub; `dtype(name, align, copy)` -> dtype.
fn reduce(callable: &Val, args: &Val) -> Result<Val> {
    let Val::Global(g) = callable else {
        bail!(
            "pickle REDUCE on a {} (only numpy's reconstructors may be called)",
            kind(callable)
        );
    };
    let Val::Tuple(a) = args else {
        bail!("pickle REDUCE with {} arguments", kind(args));
    };
    match g {
        Global::Reconstruct => {
            if a.len() != 3 || !matches!(&*a[0], Val::Global(Global::NdArray)) {
                bail!("unexpected arguments to numpy _reconstruct");
            }
            Ok(Val::Array(std::cell::RefCell::new(None)))
        }
        Global::DType => match a.first().map(|x| &**x) {
            Some(Val::Str(s)) => Ok(Val::DType(s.clone(), std::cell::Cell::new(false))),
            _ => bail!("unexpected arguments to numpy.dtype"),
        },
        Global::NdArray => bail!("pickle calls numpy.ndarray directly (not allowed)"),
    }
}

/// BUILD: set a dtype's state or fill an array stub from `(version, shape, dtype, fortran, raw)`.
fn build(target: &Val, state: &Val) -> Result<()> {
    let Val::Tuple(s) = state else {
        bail!("pickle BUILD with a {} state", kind(state));
    };
    match target {
        Val::DType(name, built) => {
            // (version, byteorder, subarray, names, fields, elsize, alignment, flags)
            let order = s.get(1).map(|v| &**v);
            match order {
                Some(Val::Str(o)) if o == "<" || o == "|" || o == "=" => {}
                _ => bail!("numpy dtype '{name}' is not little-endian"),
            }
            built.set(true);
            Ok(())
        }
        Val::Array(cell) => {
            if s.len() != 5 {
                bail!("numpy array state has {} fields, expected 5", s.len());
            }
            let shape: Vec<usize> = match &*s[1] {
                Val::Tuple(d) => d
                    .iter()
                    .map(|x| as_usize(x).context("numpy array shape is not a tuple of ints"))
                    .collect::<Result<_>>()?,
                _ => bail!("numpy array shape is not a tuple"),
            };
            match &*s[2] {
                Val::DType(n, _) if n == "f4" || n == "<f4" => {}
                Val::DType(n, _) => {
                    bail!("numpy array of dtype '{n}': only float32 arrays are accepted")
                }
                v => bail!("numpy array dtype is a {}", kind(v)),
            }
            if matches!(&*s[3], Val::Bool(true)) {
                bail!("Fortran-ordered numpy arrays are not supported");
            }
            let Val::Bytes(raw) = &*s[4] else {
                bail!("numpy array data is not bytes");
            };
            let bytes = shape
                .iter()
                .try_fold(4usize, |n, &d| n.checked_mul(d))
                .with_context(|| format!("numpy array shape {shape:?} is too large"))?;
            if raw.len() != bytes {
                bail!(
                    "numpy array of shape {shape:?} holds {} bytes, expected {bytes}",
                    raw.len()
                );
            }
            let data = raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            *cell.borrow_mut() = Some(NdArray { shape, data });
            Ok(())
        }
        v => bail!("pickle BUILD on a {} (not allowed)", kind(v)),
    }
}

/// Parse `bytes` into the flattened arrays of its nested dicts/tuples, keyed by
/// `/`-joined paths (`encoder/Conv_0/kernel`).
pub fn load_arrays(bytes: &[u8]) -> Result<BTreeMap<String, NdArray>> {
    let mut p = Pickle {
        data: bytes,
        pos: 0,
    };
    let mut stack: Vec<Rc<Val>> = Vec::new();
    let mut memo = Memo(BTreeMap::new(), Vec::new());
    let pop = |stack: &mut Vec<Rc<Val>>| stack.pop().context("pickle stack underflow");
    let pop_mark = |stack: &mut Vec<Rc<Val>>| -> Result<Vec<Rc<Val>>> {
        let m = stack
            .iter()
            .rposition(|v| matches!(**v, Val::Mark))
            .context("pickle has no MARK")?;
        let items = stack.split_off(m + 1);
        stack.pop();
        Ok(items)
    };
    let root = loop {
        let at = p.pos;
        let op = p.u8()?;
        match op {
            0x80 => {
                let v = p.u8()?; // PROTO
                if v > 5 {
                    bail!("pickle protocol {v} is not supported");
                }
            }
            0x95 => {
                p.le(8)?; // FRAME (length only; the data follows inline)
            }
            b'.' => break pop(&mut stack)?, // STOP
            b'(' => stack.push(Rc::new(Val::Mark)),
            b'N' => stack.push(Rc::new(Val::None)),
            0x88 => stack.push(Rc::new(Val::Bool(true))),
            0x89 => stack.push(Rc::new(Val::Bool(false))),
            b'K' => stack.push(Rc::new(Val::Int(p.le(1)? as i64))),
            b'M' => stack.push(Rc::new(Val::Int(p.le(2)? as i64))),
            b'J' => stack.push(Rc::new(Val::Int(p.le(4)? as u32 as i32 as i64))),
            0x8a => {
                // LONG1: little-endian two's complement of n bytes.
                let n = p.u8()? as usize;
                if n > 8 {
                    bail!("pickle integer of {n} bytes is too large");
                }
                let b = p.take(n)?;
                let mut v: i64 = 0;
                for (i, &x) in b.iter().enumerate() {
                    v |= (x as i64) << (8 * i);
                }
                if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                    v -= 1i64 << (8 * n);
                }
                stack.push(Rc::new(Val::Int(v)));
            }
            0x8c | b'X' | 0x8d => {
                // SHORT_BINUNICODE / BINUNICODE / BINUNICODE8
                let n = match op {
                    0x8c => p.le(1)?,
                    b'X' => p.le(4)?,
                    _ => p.le(8)?,
                } as usize;
                let s = String::from_utf8(p.take(n)?.to_vec()).context("pickle string is not UTF-8")?;
                stack.push(Rc::new(Val::Str(s)));
            }
            b'C' | b'B' | 0x8e => {
                // SHORT_BINBYTES / BINBYTES / BINBYTES8
                let n = match op {
                    b'C' => p.le(1)?,
                    b'B' => p.le(4)?,
                    _ => p.le(8)?,
                } as usize;
                stack.push(Rc::new(Val::Bytes(p.take(n)?.to_vec())));
            }
            b'U' => {
                // SHORT_BINSTRING (protocol 2 writes dtype names this way)
                let n = p.le(1)? as usize;
                stack.push(Rc::new(Val::Str(String::from_utf8_lossy(p.take(n)?).into_owned())));
            }
            b'T' => {
                let n = p.le(4)? as usize;
                stack.push(Rc::new(Val::Str(String::from_utf8_lossy(p.take(n)?).into_owned())));
            }
            b')' => stack.push(Rc::new(Val::Tuple(vec![]))),
            b']' => stack.push(Rc::new(Val::List(Default::default()))),
            b'}' => stack.push(Rc::new(Val::Dict(Default::default()))),
            b't' => {
                let items = pop_mark(&mut stack)?;
                stack.push(Rc::new(Val::Tuple(items)));
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                if stack.len() < n {
                    bail!("pickle stack underflow");
                }
                let items = stack.split_off(stack.len() - n);
                stack.push(Rc::new(Val::Tuple(items)));
            }
            b'e' | b'a' => {
                let items = if op == b'e' {
                    pop_mark(&mut stack)?
                } else {
                    vec![pop(&mut stack)?]
                };
                match stack.last().map(|v| &**v) {
                    Some(Val::List(l)) => l.borrow_mut().extend(items),
                    _ => bail!("pickle APPEND to a non-list"),
                }
            }
            b'u' | b's' => {
                let items = if op == b'u' {
                    pop_mark(&mut stack)?
                } else {
                    let v = pop(&mut stack)?;
                    let k = pop(&mut stack)?;
                    vec![k, v]
                };
                if items.len() % 2 != 0 {
                    bail!("pickle SETITEMS with an odd number of items");
                }
                match stack.last().map(|v| &**v) {
                    Some(Val::Dict(d)) => {
                        let mut d = d.borrow_mut();
                        for kv in items.chunks_exact(2) {
                            d.push((kv[0].clone(), kv[1].clone()));
                        }
                    }
                    _ => bail!("pickle SETITEM on a non-dict"),
                }
            }
            b'c' => {
                let module = p.line()?;
                let name = p.line()?;
                stack.push(Rc::new(Val::Global(resolve_global(&module, &name)?)));
            }
            0x93 => {
                let name = pop(&mut stack)?;
                let module = pop(&mut stack)?;
                match (&*module, &*name) {
                    (Val::Str(m), Val::Str(n)) => {
                        stack.push(Rc::new(Val::Global(resolve_global(m, n)?)))
                    }
                    _ => bail!("pickle STACK_GLOBAL with non-string names"),
                }
            }
            b'R' => {
                let args = pop(&mut stack)?;
                let callable = pop(&mut stack)?;
                stack.push(Rc::new(reduce(&callable, &args)?));
            }
            b'b' => {
                let state = pop(&mut stack)?;
                let target = stack.last().context("pickle stack underflow")?;
                build(target, &state)?;
            }
            0x94 => {
                let v = stack.last().context("pickle stack underflow")?.clone();
                let idx = memo.len() as u64;
                memo.put(idx, v);
            }
            b'q' | b'r' => {
                let idx = if op == b'q' { p.le(1)? } else { p.le(4)? };
                let v = stack.last().context("pickle stack underflow")?.clone();
                memo.put(idx, v);
            }
            b'h' | b'j' => {
                let idx = if op == b'h' { p.le(1)? } else { p.le(4)? };
                let v = memo.get(&idx).with_context(|| format!("pickle memo {idx} is unset"))?;
                stack.push(v.clone());
            }
            other => bail!(
                "pickle opcode 0x{other:02x} ('{}') at offset {at} is not allowed: only numpy float32 arrays in dicts/tuples are accepted",
                (other as char).escape_default()
            ),
        }
    };
    let mut out = BTreeMap::new();
    let mut budget = bytes.len();
    flatten(&root, String::new(), 0, &mut budget, &mut out)?;
    if out.is_empty() {
        bail!("the pickle holds no arrays");
    }
    Ok(out)
}

/// The memo of a pickle being read. A dict or list can hold itself through the memo
/// (`}q\0h\0h\0s`); dropping the memo empties every memoized dict and list, which breaks
/// every such cycle (a cycle needs a memo reference), so nothing leaks. Values a later PUT
/// replaced are kept for that too (a list memoized, made to hold itself, then its slot
/// reused: found by the fuzzer, `fuzz/found/vqgan_pickle-leak-self-list`).
struct Memo(BTreeMap<u64, Rc<Val>>, Vec<Rc<Val>>);

impl Memo {
    fn put(&mut self, idx: u64, v: Rc<Val>) {
        if let Some(old) = self.0.insert(idx, v) {
            self.1.push(old);
        }
    }
}

impl std::ops::Deref for Memo {
    type Target = BTreeMap<u64, Rc<Val>>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Memo {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Memo {
    fn drop(&mut self) {
        for v in self.0.values().chain(&self.1) {
            match &**v {
                Val::List(l) => l.borrow_mut().clear(),
                Val::Dict(d) => d.borrow_mut().clear(),
                _ => {}
            }
        }
    }
}

impl Drop for Val {
    /// Without recursion: a pickle can nest tuples a million deep (`N` then `\x85`s),
    /// more than the stack holds for a recursive drop.
    fn drop(&mut self) {
        let mut todo: Vec<Rc<Val>> = Vec::new();
        let take = |v: &mut Val, todo: &mut Vec<Rc<Val>>| match v {
            Val::Tuple(items) => todo.append(items),
            Val::List(items) => todo.append(items.get_mut()),
            Val::Dict(items) => todo.extend(items.get_mut().drain(..).flat_map(|(k, v)| [k, v])),
            _ => {}
        };
        take(self, &mut todo);
        while let Some(v) = todo.pop() {
            if let Ok(mut v) = Rc::try_unwrap(v) {
                take(&mut v, &mut todo);
            }
        }
    }
}

/// Nesting accepted in the pickled tree (VQGAN params are 3-4 levels deep).
const MAX_DEPTH: usize = 64;

/// Collect the arrays under `v`. `budget` is what is left of the file's byte count: an
/// array memoized once and referenced many times would otherwise be copied each time,
/// without bound.
fn flatten(
    v: &Val,
    prefix: String,
    depth: usize,
    budget: &mut usize,
    out: &mut BTreeMap<String, NdArray>,
) -> Result<()> {
    if depth > MAX_DEPTH {
        bail!(
            "pickle nests containers more than {MAX_DEPTH} deep at '{prefix}' (or a dict/list contains itself)"
        );
    }
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}/{k}")
        }
    };
    match v {
        Val::Dict(d) => {
            for (k, x) in d.borrow().iter() {
                let key = match &**k {
                    Val::Str(s) => s.clone(),
                    Val::Int(i) => i.to_string(),
                    other => bail!("pickle dict key is a {}", kind(other)),
                };
                flatten(x, join(&key), depth + 1, budget, out)?;
            }
        }
        Val::Tuple(items) => {
            for (i, x) in items.iter().enumerate() {
                flatten(x, join(&i.to_string()), depth + 1, budget, out)?;
            }
        }
        Val::List(items) => {
            for (i, x) in items.borrow().iter().enumerate() {
                flatten(x, join(&i.to_string()), depth + 1, budget, out)?;
            }
        }
        Val::Array(a) => {
            let arr = a
                .borrow()
                .clone()
                .context("numpy array without data (no BUILD)")?;
            let bytes = arr.data.len() * 4;
            if bytes > *budget {
                bail!("pickle refers to its arrays more often than its size allows (shared arrays at '{prefix}' and elsewhere hold more data than the file)");
            }
            *budget -= bytes;
            out.insert(prefix, arr);
        }
        other => bail!(
            "pickle holds a {} at '{prefix}'; only arrays in dicts/tuples are accepted",
            kind(other)
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_execution_is_refused_by_name() {
        // pickle.dumps of an object whose __reduce__ is (os.system, ('echo hi',)), protocol 2.
        let evil = b"\x80\x02cposix\nsystem\nq\x00X\x07\x00\x00\x00echo hiq\x01\x85q\x02Rq\x03.";
        let e = load_arrays(evil).unwrap_err().to_string();
        assert!(
            e.contains("posix.system") && e.contains("not allowed"),
            "{e}"
        );
        // An unsupported opcode (INST) is rejected before anything else happens.
        let e = load_arrays(b"\x80\x02(ios\nsystem\n.")
            .unwrap_err()
            .to_string();
        assert!(e.contains("opcode 0x69"), "{e}");
        // A dict of plain numbers is not an array file.
        let e = load_arrays(b"\x80\x02}q\x00X\x01\x00\x00\x00aK\x01s.")
            .unwrap_err()
            .to_string();
        assert!(e.contains("int"), "{e}");
    }
}
