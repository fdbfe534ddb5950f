#!/usr/bin/env python3
"""Checks the ghz load-test configs in loadtest/ without ghz: every key is one ghz knows, the
call names a method of the proto file the config gives, and every request body the config sends
encodes as that method's input message (protobuf JSON, unknown fields refused).

The request bodies ("data-file"s under loadtest/data/) are made by loadtest/prepare.py, which
this runs into a temporary folder on --image (default: a tiny PNG made here, so CI needs no
photo). The protos are compiled with grpcio-tools (tests/python/requirements.txt).

With --host HOST:PORT it also sends each config's request once to a running server and expects
OK, as a smoke test of what ghz would send.

Usage: check_ghz.py [--image PHOTO] [--host 127.0.0.1:8001] [--config loadtest/X.json ...]
Exit status: 0 when every config passes; 1 with one line per problem, naming the config.
"""

import argparse
import json
import re
import struct
import sys
import tempfile
import zlib
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "loadtest"))
import prepare  # noqa: E402  (loadtest/prepare.py: the bodies ghz.sh sends)

# Keys of ghz's config file (JSON/TOML/YAML): the json tags of ghz's runner.Config, across the
# releases documented in its "Configuration Files" and "Options Reference" pages.
GHZ_KEYS = {
    # proto
    "proto", "protoset", "call", "import-paths",
    # security
    "cacert", "cert", "key", "cname", "skipTLS", "insecure", "authority",
    # load and concurrency
    "async", "rps", "load-schedule", "load-start", "load-end", "load-step",
    "load-step-duration", "load-max-duration",
    "concurrency", "concurrency-schedule", "concurrency-start", "concurrency-end",
    "concurrency-step", "concurrency-step-duration", "concurrency-max-duration",
    "total", "timeout", "duration", "max-duration", "duration-stop",
    # data
    "data", "data-file", "binary-file", "metadata", "metadata-file", "stream-interval",
    "stream-call-duration", "stream-call-count", "stream-dynamic-messages", "reflect-metadata",
    "disable-template-functions", "disable-template-data",
    # output
    "output", "format", "skipFirst", "count-errors",
    # connection
    "connections", "connect-timeout", "keepalive", "enable-compression", "lb-strategy",
    "max-recv-message-size", "max-send-message-size",
    # meta
    "name", "tags", "cpus", "debug", "host",
}
GHZ_FORMATS = {"summary", "csv", "json", "pretty", "html", "influx-summary", "influx-details"}
DURATION_KEYS = {
    "timeout", "duration", "max-duration", "stream-interval", "stream-call-duration",
    "connect-timeout", "keepalive", "load-step-duration", "load-max-duration",
    "concurrency-step-duration", "concurrency-max-duration",
}
UINT_KEYS = {
    "total", "concurrency", "connections", "rps", "cpus", "skipFirst", "load-start", "load-end",
    "concurrency-start", "concurrency-end", "stream-call-count",
}
BOOL_KEYS = {
    "insecure", "skipTLS", "async", "enable-compression", "count-errors",
    "stream-dynamic-messages", "disable-template-functions", "disable-template-data",
}
STRING_MAP_KEYS = {"metadata", "tags", "reflect-metadata"}
# Go's time.ParseDuration, e.g. "10s", "1m30s", "250ms".
GO_DURATION = re.compile(r"^(0|([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h))+$")


def tiny_png(path, w=8, h=8):
    """An 8x8 RGB PNG (standard library only): a stand-in photo when none is given."""
    raw = b"".join(b"\x00" + b"".join(bytes((x * 32 % 256, y * 32 % 256, 128)) for x in range(w))
                   for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n"
                           + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def compile_protos(tmp):
    """Every proto under proto/ into one FileDescriptorSet; returns (pool, {file name: proto})."""
    from grpc_tools import protoc  # grpcio-tools

    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    out = Path(tmp) / "protos.pb"
    args = ["protoc", f"-I{ROOT / 'proto'}", "--include_imports", f"--descriptor_set_out={out}"]
    if protoc.main(args + protos) != 0:
        sys.exit("check_ghz: protoc failed to compile proto/ (see above)")
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for f in fds.file:
        pool.Add(f)
    return pool, {f.name: f for f in fds.file}


def parse_call(call):
    """ghz's forms: package.Service/Method or package.Service.Method (leading dot allowed)."""
    call = call.lstrip(".")
    if call.count("/") == 1:
        return tuple(call.split("/"))
    if "/" not in call and "." in call:
        return tuple(call.rsplit(".", 1))
    return None


class Checker:
    def __init__(self, pool, files, data_dir, host):
        self.pool, self.files, self.data_dir, self.host = pool, files, Path(data_dir), host
        self.problems = []

    def fail(self, config, msg):
        self.problems.append(f"{config}: {msg}")

    def repo_path(self, p):
        """Paths in configs are relative to the working directory: ghz runs from the repo root.
        Bodies under loadtest/data/ come from this run's prepare step instead."""
        p = Path(p)
        if p.is_absolute():
            return p
        try:
            return self.data_dir / p.relative_to(prepare.DATA_DIR)
        except ValueError:
            return ROOT / p

    def check_keys(self, name, cfg):
        for key, value in cfg.items():
            if key not in GHZ_KEYS:
                self.fail(name, f"unknown ghz config key {key!r}")
            elif key in DURATION_KEYS and not (isinstance(value, str) and GO_DURATION.match(value)):
                self.fail(name, f"{key!r} must be a Go duration string such as \"10s\", got {value!r}")
            elif key in UINT_KEYS and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                self.fail(name, f"{key!r} must be a non-negative integer, got {value!r}")
            elif key in BOOL_KEYS and not isinstance(value, bool):
                self.fail(name, f"{key!r} must be true or false, got {value!r}")
            elif key in STRING_MAP_KEYS and not (
                    isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
                self.fail(name, f"{key!r} must be an object of strings")
            elif key == "import-paths" and not (
                    isinstance(value, list) and all(isinstance(v, str) for v in value)):
                self.fail(name, "'import-paths' must be a list of strings")
            elif key == "format" and value not in GHZ_FORMATS:
                self.fail(name, f"'format' {value!r} is not one of {sorted(GHZ_FORMATS)}")
        for key in ("call", "host"):
            if not isinstance(cfg.get(key), str) or not cfg.get(key):
                self.fail(name, f"{key!r} is missing (the committed configs must run as they are)")
        if isinstance(cfg.get("total"), int) and isinstance(cfg.get("concurrency"), int) \
                and "duration" not in cfg and cfg["total"] < cfg["concurrency"]:
            self.fail(name, "'total' is smaller than 'concurrency' (ghz refuses that)")
        if sum(k in cfg for k in ("data", "data-file", "binary-file")) != 1:
            self.fail(name, "give exactly one of 'data', 'data-file', 'binary-file'")

    def method(self, name, cfg):
        """The method descriptor the config's call names, found as ghz would find it."""
        parsed = parse_call(cfg.get("call", ""))
        if not parsed:
            self.fail(name, f"call {cfg.get('call')!r} is not package.Service/Method")
            return None
        service, method = parsed
        if "proto" in cfg:
            proto = Path(cfg["proto"])
            if not self.repo_path(proto).is_file():
                self.fail(name, f"proto file {cfg['proto']} does not exist (paths are relative to the repo root)")
                return None
            for d in cfg.get("import-paths", []):
                if not self.repo_path(d).is_dir():
                    self.fail(name, f"import path {d} is not a directory")
            # ghz looks the service up in the given file only (not in its imports).
            rel = self.proto_name(proto, cfg.get("import-paths", []))
            f = self.files.get(rel)
            if f is None:
                self.fail(name, f"{cfg['proto']} is not under proto/ or not reachable from import-paths")
                return None
            package = f.package + "." if f.package else ""
            if not any(package + s.name == service for s in f.service):
                self.fail(name, f"call {cfg['call']!r}: no service {service} in {cfg['proto']}")
                return None
        elif "protoset" in cfg:
            self.fail(name, "protoset configs are not checked here; use 'proto' with proto/ files")
            return None
        try:
            svc = self.pool.FindServiceByName(service)
        except KeyError:
            self.fail(name, f"call {cfg['call']!r}: no service {service} in proto/")
            return None
        m = svc.methods_by_name.get(method)
        if m is None:
            self.fail(name, f"call {cfg['call']!r}: service {service} has no method {method} "
                            f"(it has {', '.join(sorted(svc.methods_by_name))})")
        return m

    def proto_name(self, proto, import_paths):
        """The proto's name relative to an import path (as protoc names files)."""
        for d in list(import_paths) + ["."]:
            try:
                return str((ROOT / proto).resolve().relative_to((ROOT / d).resolve()))
            except ValueError:
                continue
        return str(proto)

    def bodies(self, name, cfg):
        """The request messages (JSON objects, or serialized bytes) the config would send."""
        if "data" in cfg:
            data = cfg["data"]
        elif "data-file" in cfg:
            path = self.repo_path(cfg["data-file"])
            if not path.is_file():
                self.fail(name, f"data-file {cfg['data-file']} is not made by loadtest/prepare.py "
                                f"(looked for {path})")
                return []
            try:
                data = json.loads(path.read_text())
            except ValueError as e:
                self.fail(name, f"data-file {cfg['data-file']} is not JSON: {e}")
                return []
        elif "binary-file" in cfg:
            path = self.repo_path(cfg["binary-file"])
            if not path.is_file():
                self.fail(name, f"binary-file {cfg['binary-file']} does not exist")
                return []
            return [path.read_bytes()]
        else:
            return []
        if isinstance(data, dict):
            return [data]
        if isinstance(data, list) and data and all(isinstance(d, dict) for d in data):
            return data
        self.fail(name, "data must be an object or a non-empty array of objects")
        return []

    def check_semantics(self, name, method, msg):
        """What encoding alone cannot catch but the server would refuse."""
        if method.full_name == "inference.GRPCInferenceService.ModelInfer":
            if not msg.model_name:
                self.fail(name, "ModelInfer request names no model_name")
            sizes = {"FP32": 4, "UINT8": 1}
            for i, t in enumerate(msg.inputs):
                if i < len(msg.raw_input_contents) and t.datatype in sizes:
                    want = sizes[t.datatype]
                    for d in t.shape:
                        want *= d
                    got = len(msg.raw_input_contents[i])
                    if got != want:
                        self.fail(name, f"input {t.name!r} {t.datatype}{list(t.shape)} needs {want} "
                                        f"raw bytes, raw_input_contents[{i}] has {got}")
        elif method.full_name == "slimserve.v1.Classifier.Classify":
            if msg.WhichOneof("input") is None:
                self.fail(name, "Classify request has neither image nor tensor")

    def send(self, name, method, payload):
        import grpc  # grpcio, from tritonclient[grpc]

        path = f"/{method.containing_service.full_name}/{method.name}"
        with grpc.insecure_channel(self.host, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            try:
                ch.unary_unary(path)(payload, timeout=30)
            except grpc.RpcError as e:
                self.fail(name, f"{path} on {self.host} answered {e.code().name}: {e.details()}")

    def check(self, config):
        name = str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else str(config)
        try:
            cfg = json.loads(config.read_text())
        except ValueError as e:
            self.fail(name, f"not JSON: {e}")
            return
        if not isinstance(cfg, dict):
            self.fail(name, "a ghz config must be a JSON object")
            return
        before = len(self.problems)
        self.check_keys(name, cfg)
        method = self.method(name, cfg)
        if method is None:
            return
        cls = message_factory.GetMessageClass(method.input_type)
        bodies = self.bodies(name, cfg)
        for i, body in enumerate(bodies):
            where = f" (message {i})" if len(bodies) > 1 else ""
            try:
                if isinstance(body, bytes):
                    msg = cls.FromString(body)
                    if msg.UnknownFields():
                        raise ValueError("unknown fields in the binary message")
                else:
                    msg = json_format.ParseDict(body, cls(), ignore_unknown_fields=False)
            except (json_format.ParseError, ValueError, TypeError) as e:
                self.fail(name, f"request{where} does not encode as {method.input_type.full_name}: {e}")
                continue
            self.check_semantics(name, method, msg)
            if self.host and len(self.problems) == before:
                self.send(name, method, msg.SerializeToString())
        if len(self.problems) == before:
            print(f"check_ghz: ok  {name}: {cfg['call']} with {len(bodies)} request(s)"
                  + (f", answered OK by {self.host}" if self.host else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", help="photo for the Classify bodies (default: a generated 8x8 PNG)")
    ap.add_argument("--host", help="also send each request once to this running server (HOST:PORT)")
    ap.add_argument("--config", action="append", type=Path,
                    help="check only these configs (default: every loadtest/*.json)")
    args = ap.parse_args()
    configs = args.config or sorted((ROOT / "loadtest").glob("*.json"))
    if not configs:
        sys.exit("check_ghz: no configs under loadtest/")
    with tempfile.TemporaryDirectory(prefix="check_ghz.") as tmp:
        image = Path(args.image) if args.image else Path(tmp) / "tiny.png"
        if not args.image:
            tiny_png(image)
        pool, files = compile_protos(tmp)
        data_dir = Path(tmp) / "data"
        prepare.prepare(image, data_dir)
        checker = Checker(pool, files, data_dir, args.host)
        for config in configs:
            checker.check(config.resolve())
    if checker.problems:
        for p in checker.problems:
            print(f"check_ghz: FAIL {p}", file=sys.stderr)
        sys.exit(1)
    print(f"check_ghz: {len(configs)} config(s) ok")


if __name__ == "__main__":
    main()
