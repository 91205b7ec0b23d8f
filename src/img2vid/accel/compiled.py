"""compiled: the UNet and the VAE decoder compiled by Inductor, per input shape: AOTInductor artifacts built once
and loaded in seconds, or, where this torch cannot load them, torch.compile in the process.

An artifact is one network exported (torch.export) at one input shape and compiled ahead of time by Inductor into
a package of kernels (torch._inductor.aoti_compile_and_package). It holds no weights: they are inputs of every
call, as under torch.compile, so nothing of them can be folded into the artifact, any checkpoint of the same
architecture uses it, and low-memory mode may move them between calls.

Artifacts live under `cache_root()/compiled` (default ~/.cache/img2vid; IMG2VID_CACHE or XDG_CACHE_HOME move it),
one file per network and shape, named by a digest of everything that changes the compiled code: the GPU and its
compute capability, the torch and CUDA versions, img2vid's version and the source of its networks and fast paths,
the network's sizes, the dtype, the input shapes and strides, and the other fast paths in use. A change to any of
them simply makes a new file; delete the folder to reclaim the space.

A shape without an artifact runs eagerly and is remembered (`missing`); `build_missing` compiles those (minutes
for the full-size UNet), which `img2vid generate` does after writing its videos, `img2vid serve` between jobs and
`img2vid warmup` on demand. A shape whose build failed runs eagerly from then on, and the reason is kept beside
the artifact.

Whether this torch can load AOTInductor packages on this GPU is checked once, before the first build: a tiny
package is built and loaded in a separate process, so that a crash there cannot take the caller down. A package
built by a C++ compiler that carries its own C++ runtime (a $CXX of a custom build, say) crashes on load in the
process's runtime, so the check tries torch's choice first, then the other compilers on PATH, and builds with the
first whose package loads. Where none does, the backend is "jit": `build` compiles with torch.compile in this
process (Inductor keeps its kernels on disk, so later processes compile faster), which pays off in a long-lived
process such as the server; a one-video command then stays eager.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("img2vid")

NAME = "compiled"


def cache_root() -> Path:
    """img2vid's cache folder: IMG2VID_CACHE, else $XDG_CACHE_HOME/img2vid, else ~/.cache/img2vid."""
    if os.environ.get("IMG2VID_CACHE"):
        return Path(os.environ["IMG2VID_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "img2vid"


def unavailable(device: torch.device, dtype: torch.dtype, memory: str) -> str | None:
    if device.type != "cuda":
        return "needs a CUDA device"
    # Not torch._inductor: importing it takes seconds, and loading an artifact needs only the C++ loader.
    if not hasattr(getattr(torch._C, "_aoti", None), "AOTIModelPackageLoader"):
        return f"needs torch >= 2.6 with AOTInductor packages (this is {torch.__version__})"
    return None


def apply(pipe, report) -> None:
    cuda = pipe.device.type == "cuda"
    context = {
        "img2vid": _source_digest(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(pipe.device) if cuda else platform.machine(),
        "capability": list(torch.cuda.get_device_capability(pipe.device)) if cuda else None,
        "dtype": str(pipe.dtype),
        "accel": sorted(n for n, s in report.paths.items() if s == "on"),
    }
    folder = cache_root() / "compiled"
    pipe.unet_forward = CompiledNet("unet", pipe.unet, {**context, "net": asdict(pipe.config.unet)}, folder)
    pipe.decoder_forward = CompiledNet(
        "decoder", pipe.vae.decoder, {**context, "net": asdict(pipe.config.vae)}, folder
    )


def aot_probe(device: torch.device, progress: Callable[[str], None] | None = None) -> str | None:
    """None if AOTInductor packages load and run here (this torch, this GPU), else why not; checked once, the
    answer kept in the cache folder. `progress` hears of the check when it has to run (it builds a package)."""
    return _probe_record(device, progress)["unusable"]


def aot_compiler(device: torch.device) -> str | None:
    """The C++ compiler the probe found to build loadable packages (None: torch's own choice), once probed."""
    stored = _stored_record(device)
    return stored.get("cxx") if stored else None


def _record_path(facts: dict) -> Path:
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "compiled" / f"aot-probe-{digest}.json"


def _probe_facts(device: torch.device) -> dict:
    facts = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.executable}
    facts["cxx"] = os.environ.get("CXX")
    if device.type == "cuda":
        facts["device"] = torch.cuda.get_device_name(device)
    return facts


def _stored_record(device: torch.device) -> dict | None:
    record = _record_path(_probe_facts(device))
    return json.loads(record.read_text()) if record.is_file() else None


def _probe_record(device: torch.device, progress: Callable[[str], None] | None) -> dict:
    stored = _stored_record(device)
    if stored is not None:
        return stored
    if progress is not None:
        progress(
            "checking once whether this torch can load compiled artifacts on this GPU (up to a minute or two)"
        )
    unusable, cxx = _probe(device)
    facts = _probe_facts(device)
    record = _record_path(facts)
    record.parent.mkdir(parents=True, exist_ok=True)
    answer = {**facts, "unusable": unusable, "cxx": cxx}
    record.write_text(json.dumps(answer))
    return answer


def _compilers() -> list[str | None]:
    """torch's choice of C++ compiler ($CXX, else g++) as None, then the other compilers on PATH: a compiler with
    another C++ runtime than this process's (a $CXX of its own build, say) makes packages that crash on load."""
    default = shutil.which(os.environ.get("CXX") or "g++")
    seen = {os.path.realpath(default)} if default else set()
    found: list[str | None] = [None]
    for name in ("g++", "c++", "clang++"):
        path = shutil.which(name)
        if path and os.path.realpath(path) not in seen:
            seen.add(os.path.realpath(path))
            found.append(path)
    return found


_PROBE = """
import sys, torch
sys.path.insert(0, {root!r})
from img2vid.accel.compiled import _runner
run = _runner(sys.argv[1], {index})
x = torch.ones(4, 8, device="{device}")
assert torch.allclose(run([x])[0], x @ torch.full((8, 8), 0.5, device="{device}").t()), "wrong result"
"""


def _probe(device: torch.device) -> tuple[str | None, str | None]:
    """(None, compiler) for the first compiler whose package loads and runs in a separate process, else (why
    not, None)."""
    import subprocess

    net = nn.Linear(8, 8, bias=False).to(device)
    nn.init.constant_(net.weight, 0.5)
    index = _device_index(device)
    code = _PROBE.format(index=index, device=device.type, root=str(Path(__file__).resolve().parents[2]))
    reasons = []
    for cxx in _compilers():
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), _compiler(cxx, fresh=True):
            try:
                ep = torch.export.export(net, (torch.ones(4, 8, device=device),), strict=False)
                path = torch._inductor.aoti_compile_and_package(ep, package_path=str(Path(tmp) / "probe.pt2"))
            except Exception as e:
                reasons.append(f"building a package{_by(cxx)} failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            r = subprocess.run(
                [sys.executable, "-c", code, path], capture_output=True, text=True, timeout=300
            )
        if r.returncode == 0:
            return None, cxx
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        how = f"signal {-r.returncode}" if r.returncode < 0 else f"exit {r.returncode}"
        reasons.append(
            f"loading a package{_by(cxx)} failed with torch {torch.__version__} ({how}: {last[-200:]})"
        )
    return "; ".join(reasons), None


def _device_index(device: torch.device) -> int:
    """The loader's device index: the CUDA device's (the current one where unnumbered), -1 for the CPU."""
    return (device.index or torch.cuda.current_device()) if device.type == "cuda" else -1


def _by(cxx: str | None) -> str:
    return f" built by {cxx}" if cxx else ""


@contextlib.contextmanager
def _compiler(cxx: str | None, fresh: bool = False):
    """Inductor's settings for building with `cxx` (None: its own choice); `fresh` skips its caches, which would
    hand back a library another compiler built. torch's own notices while it exports and compiles (a deprecation
    inside torch.export, TF32 left off for fp32 matmuls) are hidden: a user can act on neither, and they
    interrupt the CLI's progress lines."""
    patch = {"cpp.cxx": (cxx,)} if cxx else {}
    if fresh:
        patch["force_disable_caches"] = True
    with warnings.catch_warnings(), torch._inductor.config.patch(patch):
        warnings.filterwarnings(
            "ignore", message=r"`isinstance\(treespec, LeafSpec\)`", category=FutureWarning
        )
        warnings.filterwarnings("ignore", message="TensorFloat32 tensor cores", category=UserWarning)
        yield


def _runner(path: str, index: int) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """The package's flat runner: inputs in, outputs out. Not aoti_load_package, whose device check starts a
    compiler and a Python process per CPU instruction set, seconds at every start: the file name already
    pins the GPU and torch."""
    try:
        loader = torch._C._aoti.AOTIModelPackageLoader(path, "model", False, 1, index)
    except TypeError:  # an older torch's signature
        loader = torch._inductor.aoti_load_package(path, device_index=index).loader
    return loader.run


@functools.cache
def _source_digest() -> str:
    """img2vid's version and a digest of the code that makes the graphs (models/ and accel/), once a process."""
    from ..version import __version__

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted([*root.glob("models/*.py"), *root.glob("accel/*.py")]):
        h.update(path.name.encode() + path.read_bytes())
    return f"{__version__}+{h.hexdigest()[:16]}"


class _Functional(nn.Module):
    """net(*tensors, num_frames) with the network's parameters and buffers as the first inputs: the exported graph
    owns no weights. The network is held outside the module tree, so export lifts none of its tensors."""

    def __init__(self, net: nn.Module, num_frames: int):
        super().__init__()
        self.held = [net]
        self.names = [n for n, _ in _state(net)]
        self.num_frames = num_frames

    def forward(self, weights: list[torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
        state = dict(zip(self.names, weights, strict=True))
        return torch.func.functional_call(self.held[0], state, (*tensors, self.num_frames))


def _state(net: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of `net` (non-persistent ones too), in a fixed order."""
    return [*net.named_parameters(), *((n, b) for n, b in net.named_buffers() if b is not None)]


Spec = tuple[tuple[tuple[int, ...], tuple[int, ...], str], ...]  # (shape, stride, dtype) per input tensor


def _example(shape, stride, dtype: str, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """A random tensor of this shape and these strides (which may overlap: expanded inputs)."""
    size = 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))
    base = torch.randn(size, generator=gen, device=device)
    return base.to(getattr(torch, dtype.removeprefix("torch."))).as_strided(shape, stride)


class CompiledNet:
    """Calls `net(*tensors, num_frames)` through the compiled code of its input shape where there is some, else
    eagerly (and remembers the shape in `missing`)."""

    def __init__(self, name: str, net: nn.Module, context: dict, folder: Path):
        self.name, self.net, self.context, self.folder = name, net, context, folder
        self.loaded: dict[tuple, Callable] = {}
        self.missing: dict[tuple, tuple[Spec, int]] = {}
        self.weights = [t for _, t in _state(net)]  # the same objects whatever device their data is on
        self._paths: dict[tuple, Path] = {}
        self._unloadable: set[tuple] = set()
        self._jit = None  # torch.compile of the network, once the jit backend compiled a shape

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        *tensors, num_frames = tensors
        tensors = [t.contiguous() if 0 in t.stride() else t for t in tensors]  # expanded inputs: real memory
        spec = tuple((tuple(t.shape), tuple(t.stride()), str(t.dtype)) for t in tensors)
        key = (spec, num_frames)
        run = self.loaded.get(key) or self._load(key)  # another process may have built it meanwhile
        if run is None:
            self.missing.setdefault(key, (spec, num_frames))
            return self.net(*tensors, num_frames)
        return run(*tensors)

    @property
    def device(self) -> torch.device:
        return self.weights[0].device if self.weights else torch.device("cpu")

    def backend(self, progress: Callable[[str], None] | None = None) -> str:
        """ "aot" (artifacts on disk) where this torch loads AOTInductor packages, else "jit" (torch.compile)."""
        return "jit" if aot_probe(self.device, progress) else "aot"

    def path(self, key: tuple) -> Path:
        if key not in self._paths:
            spec, num_frames = key
            digest = hashlib.sha256(
                json.dumps({**self.context, "spec": spec, "num_frames": num_frames}, sort_keys=True).encode()
            ).hexdigest()[:20]
            shape = "x".join(map(str, spec[0][0]))
            self._paths[key] = self.folder / f"{self.name}-{shape}-{digest}.pt2"
        return self._paths[key]

    def _load(self, key: tuple) -> Callable | None:
        path = self.path(key)  # exists only where the probe found packages loadable
        if key in self._unloadable or not path.is_file():
            return None
        t = time.perf_counter()
        try:
            model = _runner(str(path), _device_index(self.device))
        except Exception as e:  # a damaged file: eager, and a rebuild replaces it
            log.warning("%s: could not load %s (%s); running eagerly", self.name, path, e)
            self._unloadable.add(key)
            return None
        self.loaded[key] = run = functools.partial(_run_aot, model, self.weights)
        self.missing.pop(key, None)
        log.info("%s: loaded %s in %.2f s", self.name, path.name, time.perf_counter() - t)
        return run

    def failed_reason(self, key: tuple) -> str | None:
        note = self.path(key).with_suffix(".failed")
        return note.read_text() if note.is_file() else None

    def build(self, key: tuple, progress: Callable[[str], None] = log.info) -> bool:
        """Compile the network at `key`'s shape, so that this process's later calls (and, with the aot backend,
        later processes') run compiled. Returns whether that worked; a failure is kept beside the artifact and
        that shape runs eagerly."""
        spec, num_frames = key
        path = self.path(key)
        if key in self.loaded or (path.is_file() and key not in self._unloadable):
            return True
        if self.failed_reason(key) is not None:
            return False
        device = self.device
        gen = torch.Generator(device).manual_seed(0)
        example = tuple(_example(shape, stride, dt, device, gen) for shape, stride, dt in spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = self.backend(progress)
        t = time.perf_counter()
        shapes = " ".join("x".join(map(str, s)) for s, _, _ in spec)
        progress(
            f"compiling the {self.name} for {shapes} ({'artifact' if backend == 'aot' else 'torch.compile'})"
        )
        try:
            with torch.no_grad():
                if backend == "aot":
                    self._build_aot(path, example, num_frames)
                else:
                    self._build_jit(key, example, num_frames)
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            log.warning("%s: compiling failed (%s); that shape runs eagerly", self.name, reason)
            with contextlib.suppress(OSError):
                path.with_suffix(".failed").write_text(reason)
            return False
        progress(f"compiled the {self.name} in {time.perf_counter() - t:.0f} s")
        self.missing.pop(key, None)
        self._unloadable.discard(key)
        return True

    def _build_aot(self, path: Path, example: tuple, num_frames: int) -> None:
        with (
            tempfile.TemporaryDirectory(dir=path.parent) as tmp,
            _compiler(aot_compiler(self.device)),
            _backends_on_while_tracing(),
        ):
            ep = _export(self.net, [t.detach() for t in self.weights], example, num_frames)
            os.replace(
                torch._inductor.aoti_compile_and_package(ep, package_path=str(Path(tmp) / path.name)), path
            )

    def _build_jit(self, key: tuple, example: tuple, num_frames: int) -> None:
        if self._jit is None:
            # One compiled function, a graph per shape. Dynamo's defaults (8 graphs per code object) would quietly
            # send the ninth shape back to eager mode.
            dynamo = torch._dynamo.config
            limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
            setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
            self._jit = torch.compile(self.net, fullgraph=True, dynamic=False)
        self._jit(*example, num_frames)
        self.loaded[key] = functools.partial(_run_jit, self._jit, num_frames)


def _export(net: nn.Module, weights: list[torch.Tensor], example: tuple, num_frames: int):
    """`net` at the example's shapes as an ExportedProgram whose inputs are its weights, then the tensors. Call
    inside _backends_on_while_tracing, as the build does."""
    return torch.export.export(_Functional(net, num_frames), (weights, *example), strict=False)


@contextlib.contextmanager
def _backends_on_while_tracing():
    """torch.export turns cuDNN and oneDNN off while it traces, so its fake convolutions report NCHW outputs for
    channels-last inputs, and the choices the networks make in Python from an activation's layout
    (channels_last's group norm, the skip concatenation) were traced for a layout that never runs. With the
    backends on, as torch.compile traces and as the artifact runs, they see the layout that runs. Fake results
    cached by earlier traces with the backends off are dropped first."""
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.export import _trace as trace
    except ImportError:
        trace = None
    if not hasattr(trace, "_ignore_backend_decomps"):  # another torch: its own tracing, unchanged
        yield
        return
    clear_fakes = getattr(FakeTensorMode, "cache_clear", lambda: None)
    clear_fakes()
    saved, trace._ignore_backend_decomps = trace._ignore_backend_decomps, contextlib.nullcontext
    try:
        yield
    finally:
        trace._ignore_backend_decomps = saved
        clear_fakes()


def _run_aot(run, weights: list[torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    return run([*weights, *tensors])[0]


def _run_jit(fn, num_frames: int, *tensors: torch.Tensor) -> torch.Tensor:
    return fn(*tensors, num_frames)
