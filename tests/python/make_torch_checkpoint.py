#!/usr/bin/env python3
"""Write a PyTorch checkpoint without PyTorch, for testing `slimtrain import`.

  make_torch_checkpoint.py --safetensors model.safetensors --out ckpt.pth
      [--key state_dict] [--prefix module.] [--legacy] [--reshape NAME] [--strided]

Reads an F32 safetensors file and writes the same tensors in torch.save's zip format
(archive/data.pkl + archive/data/<n>), pickling each tensor exactly as PyTorch does:
torch._utils._rebuild_tensor_v2(persistent storage, offset, size, stride, False, OrderedDict()).
A stand-in `torch` module makes pickle emit the same GLOBAL opcodes. --legacy writes the
pre-1.6 layout instead (five pickles: magic number, protocol 1001, system info, the object,
the storage keys; then each storage as an 8-byte element count and its bytes); --strided
stores every 2-D+ tensor transposed in its storage, after 3 padding elements, and pickles it
as a strided view with that offset (as a saved `w.t()` slice would be); --reshape flattens one
tensor to test errors.
"""

import argparse
import collections
import io
import json
import pickle
import struct
import sys
import types
import zipfile

import numpy as np

torch = types.ModuleType("torch")
torch_utils = types.ModuleType("torch._utils")


class FloatStorage:
    pass


FloatStorage.__module__ = "torch"
torch.FloatStorage = FloatStorage


def _rebuild_tensor_v2(*args):
    raise RuntimeError("only for pickling")


_rebuild_tensor_v2.__module__ = "torch._utils"
torch_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
torch._utils = torch_utils
sys.modules["torch"] = torch
sys.modules["torch._utils"] = torch_utils


class Storage:
    def __init__(self, key, array):
        self.key = key
        self.array = array


class Tensor:
    def __init__(self, storage, shape, offset=0, stride=None):
        self.storage = storage
        self.shape = tuple(shape)
        self.offset = offset
        self.stride = stride

    def __reduce__(self):
        stride = self.stride
        if stride is None:
            stride = []
            acc = 1
            for d in reversed(self.shape):
                stride.insert(0, acc)
                acc *= d
        return (
            _rebuild_tensor_v2,
            (self.storage, self.offset, self.shape, tuple(stride), False, collections.OrderedDict()),
        )


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", FloatStorage, obj.key, "cpu", obj.array.size)
        return None


def read_safetensors(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = collections.OrderedDict()
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            sys.exit(f"{path}: {name} is {info['dtype']}, only F32 is supported")
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype="<f4").reshape(info["shape"])
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--safetensors", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--key", help="nest the state dict under this key")
    p.add_argument("--prefix", default="", help="prepend to every key (e.g. module.)")
    p.add_argument("--legacy", action="store_true", help="write the pre-1.6 legacy format")
    p.add_argument("--strided", action="store_true", help="store tensors as offset, transposed views")
    p.add_argument("--reshape", help="flatten this tensor to 1-D")
    args = p.parse_args()

    tensors = read_safetensors(args.safetensors)
    state = collections.OrderedDict()
    storages = []
    for i, (name, arr) in enumerate(tensors.items()):
        shape = (arr.size,) if name == args.reshape else arr.shape
        if args.strided and arr.ndim >= 2:
            # Storage: 3 padding floats, then the array with its axes reversed (C order), so
            # element [i, j, ...] sits at 3 + i + j * shape[0] + ...
            body = np.ascontiguousarray(arr.transpose(), dtype="<f4").reshape(-1)
            st = Storage(str(i), np.concatenate([np.full(3, 7.0, "<f4"), body]))
            stride, acc = [], 1
            for d in arr.shape:
                stride.append(acc)
                acc *= d
            state[args.prefix + name] = Tensor(st, shape, 3, stride)
        else:
            st = Storage(str(i), np.ascontiguousarray(arr, dtype="<f4").reshape(-1))
            state[args.prefix + name] = Tensor(st, shape)
        storages.append(st)
    obj = {args.key: state} if args.key else state

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    if args.legacy:
        with open(args.out, "wb") as f:
            for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True,
                                                       "type_sizes": {"short": 2, "int": 4, "long": 4}}):
                pickle.dump(header, f, protocol=2)
            f.write(buf.getvalue())
            pickle.dump(sorted(st.key for st in storages), f, protocol=2)
            for st in sorted(storages, key=lambda st: st.key):
                f.write(struct.pack("<q", st.array.size))
                f.write(st.array.tobytes())
        return
    with zipfile.ZipFile(args.out, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", "little")
        for st in storages:
            z.writestr(f"archive/data/{st.key}", st.array.tobytes())
        z.writestr("archive/version", "3\n")


if __name__ == "__main__":
    main()
