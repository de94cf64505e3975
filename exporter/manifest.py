"""The artifact manifest: what an exported directory holds, and how it is checked before use.

An artifact directory is::

    manifest.json         this file's content (format version, model config, I/O, cache layout, sha256s)
    model.onnx            the graph (prefill and decode share it)
    model.onnx.data       weights as ONNX external data, 4 KiB aligned
    tokenizer.json ...    tokenizer / chat template / generation config, copied when the checkpoint has them
    compiled/             backend builds (see backends/trust.py for when native code in it is loaded)

Artifacts come from strangers, so reading one is defensive:

- ``manifest.json`` is checked against a schema with bounds (types, ranges, and consistency with the
  model config) before anything is sized from it;
- every name it lists goes through :mod:`moeport.models.paths` (a plain relative path whose real path
  stays inside the directory) and is opened once; its size and sha256 are checked on that open
  descriptor, and everything moeport reads afterwards (the graph, side files, weights for backends that
  load them themselves) is read from the same descriptor, never by path again;
- the graph's inputs/outputs must match the manifest, and every external-data location inside the
  graph must be a listed file, with its byte ranges inside that file;
- a backend that must let a library open a file by path (ONNX Runtime maps ``model.onnx.data`` itself)
  calls :meth:`Artifact.check_unchanged` after loading: the path must still name the verified file
  with the same size, mtime and ctime (a swap or an in-place rewrite in between is refused).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeport.models.config import ConfigError, DeepseekConfig
from moeport.models.paths import UnsafePathError, check_name, open_inside, read_fd, read_inside

FORMAT = "moeport-artifact"
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20
MAX_FILES = 10_000
MAX_FILE_BYTES = 1 << 50
WEIGHT_DTYPES = ("fp32", "fp16", "bf16", "int8", "int4")
GRAPH_INPUTS = ("input_ids", "position_ids", "attention_mask", "logits_to_keep")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PER_LAYER_NAME = re.compile(r"^[A-Za-z0-9_.\-]*\{i\}[A-Za-z0-9_.\-]*$")


class ArtifactError(ValueError):
    """An artifact directory is missing, from an unknown format version, damaged, or not safe to load."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_fd(fd: int, size: int, chunk: int = 1 << 22) -> str:
    """sha256 of the first ``size`` bytes of an open file, read with pread (the descriptor's offset is untouched)."""
    h = hashlib.sha256()
    offset = 0
    while offset < size:
        block = os.pread(fd, min(chunk, size - offset), offset)
        if not block:
            break
        h.update(block)
        offset += len(block)
    return h.hexdigest()


def stamp(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """What identifies a file's content without reading it: device, inode, size, mtime and ctime. ctime
    cannot be set by ``os.utime``, and renames and writes update it, so an in-place rewrite shows here."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class OpenedFile:
    """A file of the artifact, opened once through the path resolver; read it through this descriptor."""

    name: str
    path: Path  # for messages, and for libraries that must open the file by path (then: check_unchanged)
    fd: int
    stat: os.stat_result
    sha256: str | None = None  # set once the content was checked against the manifest

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        size = self.stat.st_size
        length = size - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > size:
            raise ArtifactError(f"{self.path}: bytes {offset}..{offset + length} are outside the file ({size} bytes)")
        out = read_fd(self.fd, length, offset)
        if len(out) < length:
            raise ArtifactError(f"{self.path}: file shrank while being read")
        return out


def _bad(where: str, message: str) -> ArtifactError:
    return ArtifactError(f"{where}: {message}")


def _get(obj: dict[str, Any], key: str, types: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise _bad(where, f"missing field {key!r}")
    value = obj[key]
    wanted = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in wanted or not isinstance(value, wanted):
        names = "/".join(t.__name__ for t in wanted)
        raise _bad(where, f"field {key!r} must be {names}, got {type(value).__name__} {value!r:.60}")
    return value


def _int(obj: dict[str, Any], key: str, lo: int, hi: int, where: str) -> int:
    value = _get(obj, key, int, where)
    if not lo <= value <= hi:
        raise _bad(where, f"field {key!r} = {value} is outside [{lo}, {hi}]")
    return value


def validate_manifest(manifest: Any, where: str) -> DeepseekConfig:
    """Check a manifest's structure, types, bounds and internal consistency; returns its model config.

    Everything a loader sizes memory or names files from is checked here, before any allocation."""
    if not isinstance(manifest, dict):
        raise _bad(where, "not a JSON object")
    model = _get(manifest, "model", dict, where)
    raw_cfg = _get(model, "config", dict, where + " model")
    try:
        cfg = DeepseekConfig.from_dict(raw_cfg)
    except (ConfigError, TypeError, ValueError, KeyError) as exc:
        raise _bad(where, f"model.config: {exc}") from exc
    weights = _get(manifest, "weights", dict, where)
    dtype = _get(weights, "dtype", str, where + " weights")
    if dtype not in WEIGHT_DTYPES:
        raise _bad(where, f"weights.dtype {dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    _int(weights, "bytes", 0, MAX_FILE_BYTES, where + " weights")
    if dtype in ("int8", "int4"):
        block = _int(weights, "block_size", 16, 1 << 16, where + " weights")
        if block & (block - 1):
            raise _bad(where, f"weights.block_size {block} is not a power of two")
    _int(manifest, "max_seq_len", 1, cfg.max_position_embeddings, where)

    files = _get(manifest, "files", dict, where)
    if not files:
        raise _bad(where, "'files' is empty: an artifact lists every file it holds with its sha256")
    if len(files) > MAX_FILES:
        raise _bad(where, f"'files' lists {len(files)} files (at most {MAX_FILES})")
    for name, meta in files.items():
        _check_listed(name, meta, f"{where} files")

    graph = _get(manifest, "graph", dict, where)
    for key in ("file", "weights_file"):
        name = _get(graph, key, str, where + " graph")
        if name not in files:
            raise _bad(where, f"graph.{key} {name!r} is not listed in 'files' (so it could not be verified)")
    _int(graph, "opset", 1, 10_000, where + " graph")

    cache = _get(manifest, "cache", dict, where)
    if _get(cache, "kind", str, where + " cache") != "mla_latent":
        raise _bad(where, f"cache.kind {cache['kind']!r} is not 'mla_latent'")
    layers = _int(cache, "layers", 1, 1024, where + " cache")
    if layers != cfg.num_hidden_layers:
        raise _bad(where, f"cache.layers {layers} differs from the model's num_hidden_layers {cfg.num_hidden_layers}")
    dim = _int(cache, "dim", 1, 1 << 16, where + " cache")
    if dim != cfg.latent_dim:
        raise _bad(where, f"cache.dim {dim} differs from the model's latent size {cfg.latent_dim}")
    for key in ("input", "output"):
        pattern = _get(cache, key, str, where + " cache")
        if not _PER_LAYER_NAME.match(pattern):
            raise _bad(where, f"cache.{key} {pattern!r} must be a plain name containing '{{i}}' once")
    if cache["input"] == cache["output"]:
        raise _bad(where, "cache.input and cache.output name the same values")
    if _get(cache, "dtype", str, where + " cache") != "float32":
        raise _bad(where, f"cache.dtype {cache['dtype']!r} is not float32")

    compiled = manifest.get("compiled", {})
    if not isinstance(compiled, dict):
        raise _bad(where, "'compiled' must be an object")
    for name, meta in compiled.items():
        _check_listed(name, meta, f"{where} compiled")
        if not name.startswith("compiled/"):
            raise _bad(where, f"compiled entry {name!r} is not under compiled/")
    return cfg


def _check_listed(name: Any, meta: Any, where: str) -> None:
    try:
        check_name(name, "listed file")
    except UnsafePathError as exc:
        raise _bad(where, str(exc)) from exc
    if not isinstance(meta, dict):
        raise _bad(where, f"entry of {name!r} must be an object with sha256 and size")
    sha = _get(meta, "sha256", str, f"{where} {name!r}")
    if not _SHA256.match(sha):
        raise _bad(where, f"sha256 of {name!r} is not 64 lowercase hex digits")
    _int(meta, "size", 0, MAX_FILE_BYTES, f"{where} {name!r}")


class VerifiedFiles:
    """Files listed with their sha256 (and size) in a manifest-like ``listing``, opened through the path
    resolver once each and read only through those descriptors.

    Files are opened lazily (``open``) or all at once by ``verify``. ``close`` releases them (also done
    when the object is collected). ``listing_name`` names the listing in messages.
    """

    def __init__(self, directory: Path, listing: dict[str, dict[str, Any]], listing_name: str = MANIFEST):
        self.directory = Path(directory)
        self.listing = listing
        self.listing_name = listing_name
        self._opened: dict[str, OpenedFile] = {}
        self._maps: dict[str, mmap.mmap] = {}
        self._lock = threading.Lock()
        self.check_content = True  # False (read_artifact(verify=False)): sizes are checked, contents are not

    def open(self, name: str, verify: bool | None = None) -> OpenedFile:
        """The listed file ``name``, opened through the path resolver; with ``verify`` (default:
        ``check_content``) its size and sha256 are checked against the listing on the open descriptor
        (once per object)."""
        verify = self.check_content if verify is None else verify
        listed = self.listing_name
        with self._lock:
            f = self._opened.get(name)
            if f is None:
                if name not in self.listing:
                    raise ArtifactError(f"{self.directory}: {name!r} is not listed in {listed}")
                try:
                    fd, st = open_inside(self.directory, name, f"{listed} file")
                except FileNotFoundError:
                    raise ArtifactError(f"{self.directory}: file {name} listed in {listed} is missing") from None
                except UnsafePathError as exc:
                    raise ArtifactError(f"{self.directory}: {exc}") from exc
                f = OpenedFile(name, self.directory / name, fd, st)
                self._opened[name] = f
                size = self.listing[name].get("size")
                if size is not None and st.st_size != size:
                    raise ArtifactError(
                        f"{self.directory}: size of {name} does not match {listed} (damaged or truncated; "
                        "re-export the artifact)"
                    )
            if verify and f.sha256 is None:
                self._verify(f, None)
            return f

    def _verify(self, f: OpenedFile, cache: _VerifiedCache | None) -> None:
        want = self.listing[f.name]["sha256"]
        if cache is not None and cache.known(f, want):
            f.sha256 = want
            return
        if sha256_fd(f.fd, f.stat.st_size) != want:
            raise ArtifactError(
                f"{self.directory}: checksum of {f.name} does not match {self.listing_name} "
                "(the file was modified or damaged; re-export the artifact)"
            )
        f.sha256 = want
        if cache is not None:
            cache.remember(f, want)

    def verify(self, use_cache: bool = True) -> None:
        """Open every listed file and check its size and sha256 (raises :class:`ArtifactError`).

        With ``use_cache``, a file whose device, inode, size, mtime and ctime are unchanged since it last
        hashed correctly on this machine is not hashed again (as git's index does), so loading a large
        artifact does not re-read gigabytes. ctime cannot be set back by a user, so a rewrite is always
        seen. ``moeport inspect`` always hashes everything.
        """
        cache = _VerifiedCache() if use_cache else None
        for name in self.listing:
            f = self.open(name, verify=False)
            if f.sha256 is None or not use_cache:
                self._verify(f, cache)
        if cache is not None:
            cache.save()

    def read_bytes(self, name: str) -> bytes:
        return self.open(name).read()

    def read_text(self, name: str) -> str:
        try:
            return self.read_bytes(name).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ArtifactError(f"{self.directory / name}: not UTF-8 text ({exc})") from exc

    def read_json(self, name: str) -> Any:
        try:
            return json.loads(self.read_text(name))
        except (ValueError, RecursionError) as exc:
            raise ArtifactError(f"{self.directory / name}: not valid JSON ({str(exc)[:200]})") from exc

    def map(self, name: str) -> mmap.mmap:
        """A read-only memory map of the listed file, made from its verified descriptor."""
        f = self.open(name)
        with self._lock:
            m = self._maps.get(name)
            if m is None:
                if f.stat.st_size == 0:
                    raise ArtifactError(f"{f.path}: empty file")
                m = mmap.mmap(f.fd, f.stat.st_size, access=mmap.ACCESS_READ)
                self._maps[name] = m
            return m

    def check_unchanged(self, *names: str) -> None:
        """Refuse if the path of any of the opened files ``names`` no longer names the verified file unchanged
        (for files a library opened by path after verification, e.g. ONNX Runtime mapping the weights)."""
        for name in names:
            f = self.open(name)
            try:
                now = os.stat(f.path)
            except OSError as exc:
                raise ArtifactError(f"{f.path} changed while the artifact was loading ({exc.strerror})") from exc
            if stamp(now) != stamp(f.stat) or stamp(os.fstat(f.fd)) != stamp(f.stat):
                raise ArtifactError(f"{f.path} was replaced or modified while the artifact was loading; not using it")

    def close(self) -> None:
        with self._lock:
            for m in self._maps.values():
                try:
                    m.close()
                except BufferError:  # a backend still holds a view: the map goes with it
                    pass
            self._maps.clear()
            for f in self._opened.values():
                try:
                    os.close(f.fd)
                except OSError:
                    pass
            self._opened.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class Artifact(VerifiedFiles):
    """A checked manifest plus the directory it describes, with its files opened through the resolver."""

    def __init__(self, directory: Path, manifest: dict[str, Any], config: DeepseekConfig | None = None):
        self.manifest = manifest
        self.config: DeepseekConfig = config or validate_manifest(manifest, str(Path(directory) / MANIFEST))
        super().__init__(directory, manifest["files"], MANIFEST)
        self.external_files: tuple[str, ...] = ()  # files the graph reads external data from (load_graph)

    # -- facts ------------------------------------------------------------------------------------
    @property
    def graph_file(self) -> str:
        return self.manifest["graph"]["file"]

    @property
    def weights_file(self) -> str:
        return self.manifest["graph"]["weights_file"]

    @property
    def graph_path(self) -> Path:
        """For messages only: read the graph with :meth:`load_graph`."""
        return self.directory / self.graph_file

    @property
    def max_seq_len(self) -> int:
        return int(self.manifest["max_seq_len"])

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def cache(self) -> dict[str, Any]:
        return self.manifest["cache"]

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest["files"]

    def content_id(self) -> bytes:
        """The artifact's files by checksum, as canonical bytes: what a compiled form derived from it depends
        on (backends hash it into the keys of their compiled caches)."""
        return json.dumps({k: v["sha256"] for k, v in sorted(self.files.items())}, sort_keys=True).encode()

    def has(self, name: str) -> bool:
        """Whether the artifact lists the side file ``name`` (tokenizer.json, generation_config.json, ...)."""
        return name in self.files

    # -- the graph ----------------------------------------------------------------------------------
    def load_graph(self) -> Any:
        """The ONNX graph (weights left external), parsed from the verified file and checked against the
        manifest: inputs/outputs, cache width, vocabulary, and every external-data location and range."""
        import onnx

        data = self.read_bytes(self.graph_file)
        model = onnx.ModelProto()
        try:
            model.ParseFromString(data)
        except Exception as exc:  # protobuf's DecodeError and friends
            raise ArtifactError(f"{self.graph_path}: not a valid ONNX model ({exc})") from exc
        self.external_files = check_graph(self, model)
        return model

    def external_data(self, tensor: Any) -> memoryview:
        """The bytes of a graph tensor stored as external data (a view of the verified, mapped file)."""
        info = external_info(tensor)
        name = info["location"]
        m = self.map(name)
        offset, length = info["offset"], info["length"]
        return memoryview(m)[offset : offset + length]

    def load_external_data(self, model: Any) -> None:
        """Copy every external tensor's bytes into the model (from the verified files), in place."""
        from onnx import TensorProto

        for t in graph_tensors(model):
            if t.data_location == TensorProto.EXTERNAL:
                t.raw_data = bytes(self.external_data(t))
                t.data_location = TensorProto.DEFAULT
                del t.external_data[:]


def external_info(tensor: Any) -> dict[str, Any]:
    """``location`` (checked name), ``offset`` and ``length`` of an external tensor."""
    info = {e.key: e.value for e in tensor.external_data}
    where = f"tensor {tensor.name!r}"
    try:
        location = check_name(info.get("location"), f"external data of {where}")
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
    except (UnsafePathError, ValueError, KeyError) as exc:
        raise ArtifactError(f"{where}: bad external data reference ({exc})") from exc
    if length is None:
        raise ArtifactError(f"{where}: external data reference without a length")
    if offset < 0 or length < 0:
        raise ArtifactError(f"{where}: negative external data offset or length")
    return {"location": location, "offset": offset, "length": length}


def graph_tensors(model: Any):
    """Every TensorProto in a model: initializers, sparse initializers, tensor attributes, subgraphs, functions."""
    from onnx import AttributeProto

    def nodes_tensors(nodes):
        for node in nodes:
            for a in node.attribute:
                if a.type == AttributeProto.TENSOR:
                    yield a.t
                elif a.type == AttributeProto.TENSORS:
                    yield from a.tensors
                elif a.type == AttributeProto.SPARSE_TENSOR:
                    yield a.sparse_tensor.values
                    yield a.sparse_tensor.indices
                elif a.type == AttributeProto.GRAPH:
                    yield from graph_tensors_of(a.g)
                elif a.type == AttributeProto.GRAPHS:
                    for g in a.graphs:
                        yield from graph_tensors_of(g)

    def graph_tensors_of(g):
        yield from g.initializer
        for s in g.sparse_initializer:
            yield s.values
            yield s.indices
        yield from nodes_tensors(g.node)

    yield from graph_tensors_of(model.graph)
    for fn in model.functions:
        yield from nodes_tensors(fn.node)


def check_graph(artifact: Artifact, model: Any) -> tuple[str, ...]:
    """The graph must be the one the manifest describes: its inputs/outputs, cache width, vocabulary, and
    external data only in listed files, inside their bounds. Returns the files holding external data."""
    from onnx import TensorProto

    where = str(artifact.graph_path)
    cache = artifact.cache
    layers = int(cache["layers"])
    want_in = [*GRAPH_INPUTS, *(cache["input"].format(i=i) for i in range(layers))]
    want_out = ["logits", *(cache["output"].format(i=i) for i in range(layers))]
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if sorted(got_in) != sorted(want_in):
        missing = sorted(set(want_in) - set(got_in))[:3]
        extra = sorted(set(got_in) - set(want_in))[:3]
        raise ArtifactError(
            f"{where}: graph inputs do not match {MANIFEST} ({len(got_in)} inputs, {layers} cache layers; "
            f"missing {missing}, unexpected {extra})"
        )
    if sorted(got_out) != sorted(want_out):
        raise ArtifactError(f"{where}: graph outputs do not match {MANIFEST} ({len(got_out)} outputs)")

    def last_dim(value: Any) -> int | None:
        dims = value.type.tensor_type.shape.dim
        return dims[-1].dim_value if dims and dims[-1].HasField("dim_value") else None

    for v in [*model.graph.input, *model.graph.output]:
        want = None
        if v.name == "logits":
            want = artifact.vocab_size
        elif v.name not in GRAPH_INPUTS:
            want = int(cache["dim"])
        got = last_dim(v)
        if want is not None and got != want:
            raise ArtifactError(f"{where}: {v.name} has last dimension {got}, the manifest says {want}")
    files = artifact.files
    locations: set[str] = set()
    for t in graph_tensors(model):
        if t.data_location != TensorProto.EXTERNAL:
            continue
        info = external_info(t)
        locations.add(info["location"])
        if info["location"] not in files:
            raise ArtifactError(
                f"{where}: tensor {t.name!r} reads external data from {info['location']!r}, which {MANIFEST} "
                "does not list (so it could not be verified)"
            )
        size = files[info["location"]]["size"]
        if info["offset"] + info["length"] > size:
            raise ArtifactError(
                f"{where}: tensor {t.name!r} reads bytes {info['offset']}..{info['offset'] + info['length']} of "
                f"{info['location']}, which has {size}"
            )
    return tuple(sorted(locations))


def user_cache_file(name: str) -> Path:
    """A file in moeport's per-user cache folder ($XDG_CACHE_HOME/moeport, else ~/.cache/moeport)."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "moeport" / name


def read_json_or(path: Path, default: Any) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def write_json_best_effort(path: Path, data: Any) -> None:
    """Atomically replace ``path`` with ``data`` as JSON; a read-only cache is silently skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        pass


class _VerifiedCache:
    """sha256s already checked on this machine, keyed by real path, with each file's identity stamp."""

    def __init__(self) -> None:
        self.path = user_cache_file("verified.json")
        entries = read_json_or(self.path, {})
        self.entries: dict[str, list] = entries if isinstance(entries, dict) else {}
        self.dirty = False

    @staticmethod
    def _key(f: OpenedFile) -> str:
        return os.path.realpath(f.path)

    def known(self, f: OpenedFile, sha: str) -> bool:
        return self.entries.get(self._key(f)) == [*stamp(f.stat), sha]

    def remember(self, f: OpenedFile, sha: str) -> None:
        self.entries[self._key(f)] = [*stamp(f.stat), sha]
        self.dirty = True

    def save(self) -> None:
        if self.dirty:  # a read-only home only costs re-hashing next time
            write_json_best_effort(self.path, self.entries)


def read_artifact(directory: str | Path, verify: bool = True) -> Artifact:
    """Open an artifact directory: refuse unknown formats and manifests that fail the schema, and (with
    ``verify``) open and check every listed file."""
    d = Path(directory)
    if not d.is_dir():
        raise ArtifactError(f"artifact directory not found: {d}")
    path = d / MANIFEST
    try:
        raw = read_inside(d, MANIFEST, "manifest", MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise ArtifactError(f"{d}: not a moeport artifact (no {MANIFEST}); create one with `moeport export`") from None
    except UnsafePathError as exc:
        raise ArtifactError(f"{d}: {exc}") from exc
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"{path}: unreadable manifest ({str(exc)[:200]})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a moeport artifact manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format version {version!r:.40} is newer than this moeport supports "
            f"({FORMAT_VERSION}); upgrade moeport or re-export with this version"
        )
    if version < FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: artifact format version {version} is older than this moeport reads ({FORMAT_VERSION}); "
            "re-export it with `moeport export`"
        )
    artifact = Artifact(d, manifest)
    artifact.check_content = verify
    if verify:
        try:
            artifact.verify()
        except BaseException:
            artifact.close()
            raise
    return artifact


def is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
