//! A restricted unpickler for PyTorch checkpoints: it builds plain values (numbers, strings,
//! tuples, lists, dicts), `collections.OrderedDict`, storages (from persistent ids) and tensors
//! (`torch._utils._rebuild_tensor_v2` and friends), and refuses every other global by name.
//! Nothing is ever called or imported: a global is a name compared against an allow-list.
//!
//! Covers the opcodes of pickle protocols 0-5 that `torch.save` and `pickle.dump` emit for
//! state dicts; anything else (e.g. `INST`, `OBJ`, `EXT*`) is an error naming the opcode.
//! Every length is checked against the remaining input before anything is allocated, so a
//! truncated or mutated file is an error, never a panic or a huge allocation.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;

/// Element type of a PyTorch storage (`torch.FloatStorage` etc.).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StorageDtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageDtype {
    pub fn size(self) -> usize {
        match self {
            StorageDtype::F64 | StorageDtype::I64 => 8,
            StorageDtype::F32 | StorageDtype::I32 => 4,
            StorageDtype::F16 | StorageDtype::BF16 | StorageDtype::I16 => 2,
            StorageDtype::I8 | StorageDtype::U8 | StorageDtype::Bool => 1,
        }
    }

    fn from_storage_name(name: &str) -> Option<Self> {
        Some(match name {
            "DoubleStorage" => StorageDtype::F64,
            "FloatStorage" => StorageDtype::F32,
            "HalfStorage" => StorageDtype::F16,
            "BFloat16Storage" => StorageDtype::BF16,
            "LongStorage" => StorageDtype::I64,
            "IntStorage" => StorageDtype::I32,
            "ShortStorage" => StorageDtype::I16,
            "CharStorage" => StorageDtype::I8,
            "ByteStorage" => StorageDtype::U8,
            "BoolStorage" => StorageDtype::Bool,
            _ => return None,
        })
    }

    /// `torch.float32` etc., as newer checkpoints name the dtype of an untyped storage.
    fn from_dtype_name(name: &str) -> Option<Self> {
        Some(match name {
            "float64" | "double" => StorageDtype::F64,
            "float32" | "float" => StorageDtype::F32,
            "float16" | "half" => StorageDtype::F16,
            "bfloat16" => StorageDtype::BF16,
            "int64" | "long" => StorageDtype::I64,
            "int32" | "int" => StorageDtype::I32,
            "int16" | "short" => StorageDtype::I16,
            "int8" => StorageDtype::I8,
            "uint8" => StorageDtype::U8,
            "bool" => StorageDtype::Bool,
            _ => return None,
        })
    }
}

/// The globals a checkpoint may name; everything else is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildTensor,
    RebuildParameter,
    /// `torch.FloatStorage` etc. (the storage type in a persistent id), or `torch.float32`.
    Dtype(StorageDtype),
}

impl Global {
    fn resolve(module: &str, name: &str) -> Option<Self> {
        Some(match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch", n) => Global::Dtype(
                StorageDtype::from_storage_name(n).or_else(|| StorageDtype::from_dtype_name(n))?,
            ),
            _ => return None,
        })
    }
}

/// A storage named by a persistent id: `('storage', type, key, location, numel[, view])`.
#[derive(Debug, Clone, PartialEq)]
pub struct StorageRef {
    pub key: String,
    pub dtype: StorageDtype,
    /// Elements, as recorded in the persistent id (checked against the data when read).
    pub numel: u64,
    /// Legacy storage views: the element offset into the storage `key`.
    pub view_offset: u64,
}

/// A tensor as `_rebuild_tensor_v2` describes it: a strided view of a storage.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef {
    pub storage: StorageRef,
    /// In elements, from the storage's start.
    pub offset: u64,
    pub size: Vec<u64>,
    pub stride: Vec<u64>,
}

type Shared<T> = Rc<RefCell<T>>;

/// A value on the unpickler's stack.
#[derive(Debug, Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Rc<Vec<Value>>),
    List(Shared<Vec<Value>>),
    /// Dicts and OrderedDicts, in insertion order.
    Dict(Shared<Vec<(Value, Value)>>),
    Global(Global),
    Storage(StorageRef),
    Tensor(Rc<TensorRef>),
}

/// The allocation behind a container value (what a reference cycle would go through).
fn container_ptr(value: &Value) -> Option<*const ()> {
    match value {
        Value::List(l) => Some(Rc::as_ptr(l).cast()),
        Value::Dict(d) => Some(Rc::as_ptr(d).cast()),
        Value::Tuple(t) => Some(Rc::as_ptr(t).cast()),
        _ => None,
    }
}

/// Refuses to put into `target` a value that holds `target` at any depth: the reference cycle
/// would never be freed (`Rc`), so every such file read would leak (found by the `checkpoint`
/// fuzz target). PyTorch never writes one. Walks with its own stack, so deep nesting cannot
/// overflow the thread's.
fn refuse_cycle(target: &Value, items: &[Value]) -> Result<(), PickleError> {
    let Some(goal) = container_ptr(target) else {
        return Ok(());
    };
    let mut seen = std::collections::HashSet::new();
    let containers = |vs: &mut dyn Iterator<Item = &Value>| -> Vec<Value> {
        vs.filter(|v| container_ptr(v).is_some()).cloned().collect()
    };
    let mut stack: Vec<Value> = containers(&mut items.iter());
    while let Some(v) = stack.pop() {
        let Some(ptr) = container_ptr(&v) else {
            continue;
        };
        if ptr == goal {
            return Err(PickleError::Malformed(
                "a list or dict that contains itself (a reference cycle)".into(),
            ));
        }
        if !seen.insert(ptr) {
            continue;
        }
        let inner = match &v {
            Value::List(l) => containers(&mut l.borrow().iter()),
            Value::Dict(d) => containers(&mut d.borrow().iter().flat_map(|(k, v)| [k, v])),
            Value::Tuple(t) => containers(&mut t.iter()),
            _ => Vec::new(),
        };
        stack.extend(inner);
    }
    Ok(())
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }

    fn as_int(&self, what: &str) -> Result<i64, PickleError> {
        match self {
            Value::Int(i) => Ok(*i),
            Value::Bool(b) => Ok(*b as i64),
            other => Err(PickleError::Malformed(format!(
                "{what}: expected an int, got {}",
                other.kind()
            ))),
        }
    }

    fn as_dims(&self, what: &str) -> Result<Vec<u64>, PickleError> {
        let items = match self {
            Value::Tuple(t) => t.as_ref().clone(),
            Value::List(l) => l.borrow().clone(),
            other => {
                return Err(PickleError::Malformed(format!(
                    "{what}: expected a tuple, got {}",
                    other.kind()
                )))
            }
        };
        items
            .iter()
            .map(|v| {
                let i = v.as_int(what)?;
                u64::try_from(i)
                    .map_err(|_| PickleError::Malformed(format!("{what}: negative value {i}")))
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PickleError {
    #[error("the pickle ends early (at byte {0})")]
    Truncated(usize),
    #[error("refused global `{module}.{name}`: a checkpoint may only name tensors, storages and OrderedDict (nothing is executed)")]
    RefusedGlobal { module: String, name: String },
    #[error("unsupported pickle opcode 0x{opcode:02x} at byte {at}")]
    Opcode { opcode: u8, at: usize },
    #[error("malformed pickle: {0}")]
    Malformed(String),
}

/// Unpickles one pickle from the front of `data`; returns the value and the bytes consumed.
pub fn load(data: &[u8]) -> Result<(Value, usize), PickleError> {
    let mut u = Unpickler {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    let value = u.run()?;
    Ok((value, u.pos))
}

/// The most stack entries and memo slots a checkpoint pickle may use: a state dict with
/// thousands of tensors needs a few tens of thousands; this bounds a hostile file's memory.
const MAX_ITEMS: usize = 1 << 22;

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Stack heights at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

impl<'a> Unpickler<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PickleError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or(PickleError::Truncated(self.data.len()))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, PickleError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, PickleError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, PickleError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, PickleError> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    /// A length read from the file, checked against what is left so nothing huge is allocated.
    fn len(&mut self, n: u64) -> Result<usize, PickleError> {
        let left = (self.data.len() - self.pos) as u64;
        if n > left {
            return Err(PickleError::Truncated(self.data.len()));
        }
        Ok(n as usize)
    }

    fn line(&mut self) -> Result<&'a str, PickleError> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or(PickleError::Truncated(self.data.len()))?;
        self.pos += end + 1;
        std::str::from_utf8(&rest[..end])
            .map_err(|_| PickleError::Malformed("a text line is not UTF-8".into()))
    }

    fn utf8(&mut self, n: u64) -> Result<Value, PickleError> {
        let n = self.len(n)?;
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(|s| Value::Str(s.to_string()))
            .map_err(|_| PickleError::Malformed("a string is not UTF-8".into()))
    }

    fn push(&mut self, v: Value) -> Result<(), PickleError> {
        if self.stack.len() >= MAX_ITEMS {
            return Err(PickleError::Malformed("stack too deep".into()));
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> Result<Value, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(PickleError::Malformed(format!(
                "stack underflow at byte {}",
                self.pos
            )));
        }
        Ok(self.stack.pop().expect("checked non-empty"))
    }

    fn top(&mut self) -> Result<&mut Value, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(PickleError::Malformed(format!(
                "empty stack at byte {}",
                self.pos
            )));
        }
        Ok(self.stack.last_mut().expect("checked non-empty"))
    }

    /// Pops everything down to the last MARK (and the mark).
    fn pop_mark(&mut self) -> Result<Vec<Value>, PickleError> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| PickleError::Malformed(format!("no MARK at byte {}", self.pos)))?;
        Ok(self.stack.split_off(mark))
    }

    fn memo_put(&mut self, key: u32) -> Result<(), PickleError> {
        let v = self.top()?.clone();
        if self.memo.len() >= MAX_ITEMS && !self.memo.contains_key(&key) {
            return Err(PickleError::Malformed("too many memo entries".into()));
        }
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Result<(), PickleError> {
        let v = self
            .memo
            .get(&key)
            .cloned()
            .ok_or_else(|| PickleError::Malformed(format!("memo key {key} not set")))?;
        self.push(v)
    }

    fn set_items(target: &Value, items: Vec<Value>) -> Result<(), PickleError> {
        refuse_cycle(target, &items)?;
        let Value::Dict(d) = target else {
            return Err(PickleError::Malformed(format!(
                "SETITEM(S) on a {}",
                target.kind()
            )));
        };
        if !items.len().is_multiple_of(2) {
            return Err(PickleError::Malformed(
                "SETITEMS with an odd item count".into(),
            ));
        }
        let mut d = d.borrow_mut();
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            match d.iter_mut().find(|(old, _)| same_key(old, &k)) {
                Some(slot) => slot.1 = v,
                None => d.push((k, v)),
            }
        }
        Ok(())
    }

    fn append(target: &Value, items: Vec<Value>) -> Result<(), PickleError> {
        refuse_cycle(target, &items)?;
        match target {
            Value::List(l) => {
                l.borrow_mut().extend(items);
                Ok(())
            }
            other => Err(PickleError::Malformed(format!(
                "APPEND(S) on a {}",
                other.kind()
            ))),
        }
    }

    fn run(&mut self) -> Result<Value, PickleError> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    // PROTO
                    let p = self.u8()?;
                    if p > 5 {
                        return Err(PickleError::Malformed(format!(
                            "pickle protocol {p} is newer than 5"
                        )));
                    }
                }
                0x95 => {
                    // FRAME: a length hint only.
                    self.u64()?;
                }
                b'.' => return self.pop(),
                b'(' => {
                    if self.marks.len() >= MAX_ITEMS {
                        return Err(PickleError::Malformed("too many MARKs".into()));
                    }
                    self.marks.push(self.stack.len());
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)?;
                }
                b'N' => self.push(Value::None)?,
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'J' => {
                    let v = self.u32()? as i32 as i64;
                    self.push(Value::Int(v))?
                }
                b'K' => {
                    let v = self.u8()? as i64;
                    self.push(Value::Int(v))?
                }
                b'M' => {
                    let v = self.u16()? as i64;
                    self.push(Value::Int(v))?
                }
                0x8a | 0x8b => {
                    // LONG1 / LONG4: little-endian two's complement of n bytes.
                    let n = if op == 0x8a {
                        self.u8()? as u64
                    } else {
                        self.u32()? as u64
                    };
                    let n = self.len(n)?;
                    let bytes = self.take(n)?;
                    self.push(long_value(bytes))?
                }
                b'I' | b'L' => {
                    // INT / LONG (protocol 0 text): "01"/"00" are True/False.
                    let line = self.line()?.trim_end_matches('L');
                    let v = match line {
                        "01" => Value::Bool(true),
                        "00" => Value::Bool(false),
                        s => Value::Int(s.parse().map_err(|_| {
                            PickleError::Malformed(format!("bad integer literal `{s}`"))
                        })?),
                    };
                    self.push(v)?
                }
                b'G' => {
                    let b = self.take(8)?;
                    let v = f64::from_be_bytes(b.try_into().expect("8 bytes"));
                    self.push(Value::Float(v))?
                }
                b'F' => {
                    let line = self.line()?;
                    let v = line.trim().parse().map_err(|_| {
                        PickleError::Malformed(format!("bad float literal `{line}`"))
                    })?;
                    self.push(Value::Float(v))?
                }
                b'X' => {
                    let n = self.u32()? as u64;
                    let v = self.utf8(n)?;
                    self.push(v)?
                }
                0x8c => {
                    let n = self.u8()? as u64;
                    let v = self.utf8(n)?;
                    self.push(v)?
                }
                0x8d => {
                    let n = self.u64()?;
                    let v = self.utf8(n)?;
                    self.push(v)?
                }
                b'T' | b'U' | b'B' | b'C' | 0x8e => {
                    // BINSTRING / SHORT_BINSTRING / BINBYTES / SHORT_BINBYTES / BINBYTES8
                    let n = match op {
                        b'U' | b'C' => self.u8()? as u64,
                        0x8e => self.u64()?,
                        _ => self.u32()? as u64,
                    };
                    let n = self.len(n)?;
                    let b = self.take(n)?.to_vec();
                    let v = if matches!(op, b'T' | b'U') {
                        match String::from_utf8(b) {
                            Ok(s) => Value::Str(s),
                            Err(e) => Value::Bytes(e.into_bytes()),
                        }
                    } else {
                        Value::Bytes(b)
                    };
                    self.push(v)?
                }
                b'V' => {
                    let line = self.line()?.to_string();
                    self.push(Value::Str(line))?
                }
                b')' => self.push(Value::Tuple(Rc::new(Vec::new())))?,
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(Rc::new(items)))?
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(Value::Tuple(Rc::new(items)))?
                }
                b']' => self.push(Value::List(Rc::new(RefCell::new(Vec::new()))))?,
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(Rc::new(RefCell::new(items))))?
                }
                b'}' => self.push(Value::Dict(Rc::new(RefCell::new(Vec::new()))))?,
                b'd' => {
                    let items = self.pop_mark()?;
                    let d = Value::Dict(Rc::new(RefCell::new(Vec::new())));
                    Self::set_items(&d, items)?;
                    self.push(d)?
                }
                b'a' => {
                    let v = self.pop()?;
                    let target = self.top()?.clone();
                    Self::append(&target, vec![v])?
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?.clone();
                    Self::append(&target, items)?
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let target = self.top()?.clone();
                    Self::set_items(&target, vec![k, v])?
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?.clone();
                    Self::set_items(&target, items)?
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    self.memo_put(k)?
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    self.memo_put(k)?
                }
                b'h' => {
                    let k = self.u8()? as u32;
                    self.memo_get(k)?
                }
                b'j' => {
                    let k = self.u32()?;
                    self.memo_get(k)?
                }
                b'p' | b'g' => {
                    let line = self.line()?;
                    let k: u32 = line
                        .parse()
                        .map_err(|_| PickleError::Malformed(format!("bad memo key `{line}`")))?;
                    if op == b'p' {
                        self.memo_put(k)?
                    } else {
                        self.memo_get(k)?
                    }
                }
                b'c' => {
                    let module = self.line()?.to_string();
                    let name = self.line()?.to_string();
                    self.push(global(&module, &name)?)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Value::Str(m), Value::Str(n)) => self.push(global(&m, &n)?)?,
                        _ => {
                            return Err(PickleError::Malformed(
                                "STACK_GLOBAL needs two strings".into(),
                            ))
                        }
                    }
                }
                b'R' | 0x81 => {
                    // REDUCE / NEWOBJ: callable(*args), for allowed globals only.
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = call(&callable, &args)?;
                    self.push(v)?
                }
                b'b' => {
                    // BUILD: state for an object already built. OrderedDicts carry their
                    // `_metadata` this way; the state is not needed, so it is dropped.
                    let _state = self.pop()?;
                    let target = self.top()?;
                    if !matches!(target, Value::Dict(_) | Value::Tensor(_)) {
                        return Err(PickleError::Malformed(format!(
                            "BUILD on a {}",
                            target.kind()
                        )));
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = persistent_load(&pid)?;
                    self.push(v)?
                }
                b'P' => {
                    let line = self.line()?.to_string();
                    return Err(PickleError::Malformed(format!(
                        "text persistent id `{line}` is not a PyTorch storage"
                    )));
                }
                _ => return Err(PickleError::Opcode { opcode: op, at }),
            }
        }
    }
}

/// Keys compare by value for the types state dicts use.
fn same_key(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Str(x), Value::Str(y)) => x == y,
        (Value::Int(x), Value::Int(y)) => x == y,
        _ => false,
    }
}

fn long_value(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Int(0);
    }
    if bytes.len() <= 8 {
        let negative = bytes[bytes.len() - 1] & 0x80 != 0;
        let mut buf = if negative { [0xffu8; 8] } else { [0u8; 8] };
        buf[..bytes.len()].copy_from_slice(bytes);
        Value::Int(i64::from_le_bytes(buf))
    } else {
        // Wider than i64 (torch's legacy magic number): kept as its bytes.
        Value::Bytes(bytes.to_vec())
    }
}

fn global(module: &str, name: &str) -> Result<Value, PickleError> {
    Global::resolve(module, name)
        .map(Value::Global)
        .ok_or_else(|| PickleError::RefusedGlobal {
            module: module.to_string(),
            name: name.to_string(),
        })
}

fn tuple_items(args: &Value, what: &str) -> Result<Vec<Value>, PickleError> {
    match args {
        Value::Tuple(t) => Ok(t.as_ref().clone()),
        other => Err(PickleError::Malformed(format!(
            "{what}: arguments must be a tuple, got {}",
            other.kind()
        ))),
    }
}

fn call(callable: &Value, args: &Value) -> Result<Value, PickleError> {
    let Value::Global(g) = callable else {
        return Err(PickleError::Malformed(format!(
            "REDUCE on a {}, not a global",
            callable.kind()
        )));
    };
    match g {
        Global::OrderedDict => {
            let items = tuple_items(args, "OrderedDict")?;
            if !items.is_empty() {
                return Err(PickleError::Malformed(
                    "OrderedDict with constructor arguments".into(),
                ));
            }
            Ok(Value::Dict(Rc::new(RefCell::new(Vec::new()))))
        }
        Global::RebuildTensorV2 | Global::RebuildTensor => {
            let a = tuple_items(args, "_rebuild_tensor")?;
            if a.len() < 4 {
                return Err(PickleError::Malformed(format!(
                    "_rebuild_tensor takes at least 4 arguments, got {}",
                    a.len()
                )));
            }
            let Value::Storage(storage) = &a[0] else {
                return Err(PickleError::Malformed(format!(
                    "_rebuild_tensor: first argument is a {}, not a storage",
                    a[0].kind()
                )));
            };
            let offset = u64::try_from(a[1].as_int("tensor offset")?)
                .map_err(|_| PickleError::Malformed("negative tensor offset".into()))?;
            let size = a[2].as_dims("tensor size")?;
            let stride = a[3].as_dims("tensor stride")?;
            if size.len() != stride.len() {
                return Err(PickleError::Malformed(format!(
                    "tensor size {size:?} and stride {stride:?} differ in rank"
                )));
            }
            Ok(Value::Tensor(Rc::new(TensorRef {
                storage: storage.clone(),
                offset: offset
                    .checked_add(storage.view_offset)
                    .ok_or_else(|| PickleError::Malformed("tensor offset overflows".into()))?,
                size,
                stride,
            })))
        }
        Global::RebuildParameter => {
            let a = tuple_items(args, "_rebuild_parameter")?;
            match a.first() {
                Some(t @ Value::Tensor(_)) => Ok(t.clone()),
                _ => Err(PickleError::Malformed(
                    "_rebuild_parameter without a tensor".into(),
                )),
            }
        }
        Global::Dtype(_) => Err(PickleError::Malformed(
            "a storage type is not callable here".into(),
        )),
    }
}

/// `('storage', storage_type, key, location, numel)` (zip) or the legacy
/// `('storage', storage_type, key, location, numel, view_metadata)`.
fn persistent_load(pid: &Value) -> Result<Value, PickleError> {
    let items = tuple_items(pid, "persistent id")?;
    let bad = |m: &str| PickleError::Malformed(format!("persistent id: {m}"));
    match items.first() {
        Some(Value::Str(s)) if s == "storage" => {}
        _ => return Err(bad("not a ('storage', ...) tuple")),
    }
    if items.len() < 5 {
        return Err(bad("too few fields"));
    }
    let dtype = match &items[1] {
        Value::Global(Global::Dtype(d)) => *d,
        other => return Err(bad(&format!("storage type is a {}", other.kind()))),
    };
    let key = match &items[2] {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        other => return Err(bad(&format!("storage key is a {}", other.kind()))),
    };
    let numel = u64::try_from(items[4].as_int("storage size")?)
        .map_err(|_| bad("negative storage size"))?;
    let mut view_offset = 0;
    if let Some(Value::Tuple(view)) = items.get(5) {
        // (view_key, offset, view_size): a view into another storage (very old PyTorch).
        if view.len() != 3 {
            return Err(bad("storage view metadata is not (key, offset, size)"));
        }
        view_offset = u64::try_from(view[1].as_int("view offset")?)
            .map_err(|_| bad("negative view offset"))?;
    }
    Ok(Value::Storage(StorageRef {
        key,
        dtype,
        numel,
        view_offset,
    }))
}

impl fmt::Display for StorageDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_containers_that_contain_themselves() {
        // l = []; l.append(l)  (memo 0 is the list)
        let direct = b"\x80\x02]q\x00h\x00a.";
        // l = []; l.append((l,))  (the cycle goes through a tuple)
        let via_tuple = b"\x80\x02]q\x00h\x00\x85a.";
        // d = {}; d["k"] = [d]
        let via_dict = b"\x80\x02}q\x00X\x01\x00\x00\x00kh\x00\x85s.";
        for pickle in [&direct[..], via_tuple, via_dict] {
            let err = load(pickle).unwrap_err();
            assert!(err.to_string().contains("contains itself"), "{err}");
        }
        // Shared, acyclic: t = (1,); [t, t] is fine.
        let shared = b"\x80\x02]q\x00K\x01\x85q\x01h\x01\x86a.";
        assert!(load(shared).is_ok());
    }

    #[test]
    fn refuses_code_execution_by_name() {
        // pickle.dumps of os.system('echo hi') via __reduce__, protocol 2.
        let evil = b"\x80\x02cposix\nsystem\nq\x00X\x07\x00\x00\x00echo hiq\x01\x85q\x02Rq\x03.";
        let err = load(evil).unwrap_err();
        assert_eq!(
            err,
            PickleError::RefusedGlobal {
                module: "posix".into(),
                name: "system".into()
            }
        );
        assert!(err.to_string().contains("`posix.system`"), "{err}");
        // builtins.eval through STACK_GLOBAL (protocol 4).
        let evil4 = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.";
        assert!(matches!(
            load(evil4),
            Err(PickleError::RefusedGlobal { .. })
        ));
    }

    #[test]
    fn builds_plain_values_and_shares_memoised_containers() {
        // pickle.dumps({'a': [1, 2.5, 'x'], 'b': (True, None)}, protocol=2)
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01G@\x04\x00\x00\x00\x00\x00\x00X\x01\x00\x00\x00xq\x03eX\x01\x00\x00\x00bq\x04\x88N\x86q\x05u.";
        let (v, used) = load(p).unwrap();
        assert_eq!(used, p.len());
        let Value::Dict(d) = v else { panic!("{v:?}") };
        let d = d.borrow();
        assert_eq!(d.len(), 2);
        let Value::List(l) = &d[0].1 else { panic!() };
        let l = l.borrow();
        assert!(matches!(l[0], Value::Int(1)));
        assert!(matches!(l[1], Value::Float(f) if f == 2.5));
        assert!(matches!(&l[2], Value::Str(s) if s == "x"));
        assert!(matches!(&d[1].1, Value::Tuple(t) if matches!(t[0], Value::Bool(true))));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let p = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01G@\x04\x00\x00\x00\x00\x00\x00X\x01\x00\x00\x00xq\x03eX\x01\x00\x00\x00bq\x04\x88N\x86q\x05u.";
        for n in 0..p.len() {
            assert!(load(&p[..n]).is_err(), "prefix of {n} bytes");
        }
    }

    #[test]
    fn huge_lengths_do_not_allocate() {
        // BINUNICODE8 claiming 2^62 bytes, BINBYTES claiming 4 GB.
        let p = b"\x80\x04\x8d\x00\x00\x00\x00\x00\x00\x00\x40abc";
        assert!(matches!(load(p), Err(PickleError::Truncated(_))));
        let p = b"\x80\x02B\xff\xff\xff\xffab";
        assert!(matches!(load(p), Err(PickleError::Truncated(_))));
    }

    #[test]
    fn long1_values() {
        assert!(matches!(long_value(&[0xff]), Value::Int(-1)));
        assert!(matches!(long_value(&[0x00, 0x01]), Value::Int(256)));
        assert!(matches!(long_value(&[0x80, 0xff]), Value::Int(-128)));
        assert!(matches!(long_value(&[1; 10]), Value::Bytes(_)));
    }
}
