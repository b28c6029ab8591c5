"""The real sglang engine's CUDA-graph metadata replay, loaded from its wheel: the oracle tests and benchmarks
hold copytune against (``tests/engine``, ``copytune bench --engine``, ``benchmarks/bench_engine.py``).

Why a loader: the only trustworthy oracle for copytune's metadata copies is the engine's own code, and importing
sglang needs GPU-only packages. So the wheel is downloaded once (``pip download``, cached under
``$COPYTUNE_TEST_CACHE`` or ``~/.cache/copytune-tests/sglang``) and a ``sys.meta_path`` finder serves ``sglang.*``
from it: the source files of the replay path run for real, every other module the wheel holds is a permissive stub
(platform probes such as ``is_cuda()`` answer False, so the portable path runs on CPU and GPU alike), and a module the
wheel does not hold does not exist. Nothing of the engine is copied into this repository.

Usage (call ``load`` in every test, e.g. from a function-scoped fixture: it is cached, and it is what swaps the
version's modules back into ``sys.modules`` after another version was loaded)::

    engine = load("0.5.23")
    backend = engine.make_backend([2, 4])
    pre = engine.make_precomputed(4, "decode", 100)
    backend.init_forward_metadata_replay_cuda_graph_from_precomputed(
        bs=4, precomputed=pre, forward_mode=engine.forward_mode("decode"))
    state = engine.snapshot(backend)
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import math
import os
import shutil
import subprocess
import sys
import tempfile
import types
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

VERSIONS = ("0.5.10", "0.5.23")

# The engine's defaults for a DeepSeek sparse-attention model.
_INDEX_TOPK = 2048  # index_topk: {dsa,nsa}_cache_seqlens are clamped to it
_SM_PARTS = 132  # FlashMLA tile-scheduler rows (one per SM part; an H100 has 132 SMs)
_TILE_FIELDS = 8  # FlashMLA TileSchedulerMetaDataSize
_POOL_SLOTS = 1 << 20  # KV-cache slots page indices are drawn from

_MARKER = ".copytune-complete"
_WHEEL_PLATFORM = "manylinux_2_34_x86_64"  # 0.5.23 ships cp311 manylinux wheels only; 0.5.10 is py3-none-any
_DOWNLOAD_TIMEOUT_S = 900


class EngineUnavailable(Exception):
    """The engine's wheel could not be obtained (registry unreachable, download failed, unusable wheel)."""


# --------------------------------------------------------------------------------------------------- wheel cache


def cache_dir() -> Path:
    """Where extracted wheels live: ``$COPYTUNE_TEST_CACHE``, else ``~/.cache/copytune-tests/sglang``."""
    configured = os.environ.get("COPYTUNE_TEST_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "copytune-tests" / "sglang"


def _pip_command(version: str, dest: Path) -> list[str]:
    """The engine's wheel alone: nothing of it is installed, its dependencies are never needed."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--python-version", "3.11", "--only-binary=:all:",
            "--platform", _WHEEL_PLATFORM, "--disable-pip-version-check", "--quiet", "--retries", "1",
            "--timeout", "30", f"sglang=={version}", "-d", str(dest)]


def engine_source(version: str) -> Path:
    """The directory holding ``version``'s extracted wheel; downloads and extracts it the first time.

    Safe against concurrent test processes: each extracts into its own temporary directory beside the target and
    renames it into place with the completion marker already inside, so a reader sees a whole tree or none.
    """
    root = cache_dir()
    target = root / version
    if (target / _MARKER).is_file():
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=root))
    except OSError as exc:
        raise EngineUnavailable(f"sglang=={version}: cache directory {root} is unusable: {exc}") from exc
    try:
        wheel = _download(version, staging / "wheel")
        tree = staging / "tree"
        _extract(wheel, tree)
        _publish(tree, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _download(version: str, dest: Path) -> Path:
    try:
        proc = subprocess.run(_pip_command(version, dest), capture_output=True, text=True,
                              timeout=_DOWNLOAD_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineUnavailable(f"sglang=={version}: pip download did not complete: {exc}") from exc
    wheels = sorted(dest.glob(f"sglang-{version}-*.whl")) if dest.is_dir() else []
    if proc.returncode != 0 or not wheels:
        tail = " | ".join((proc.stderr or proc.stdout or "").strip().splitlines()[-3:]) or "no wheel written"
        raise EngineUnavailable(f"sglang=={version}: pip download exited {proc.returncode}: {tail}")
    return wheels[0]


def _extract(wheel: Path, tree: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(tree)
    except (zipfile.BadZipFile, OSError) as exc:
        raise EngineUnavailable(f"{wheel.name}: cannot extract: {exc}") from exc
    if not (tree / "sglang").is_dir():
        raise EngineUnavailable(f"{wheel.name}: no sglang package inside")
    (tree / _MARKER).write_text(wheel.name + "\n")


def _publish(tree: Path, target: Path) -> None:
    """Rename ``tree`` to ``target``; a complete tree another process published first wins and is kept."""
    try:
        os.rename(tree, target)
        return
    except OSError:
        if (target / _MARKER).is_file():
            return
    stale = target.with_name(f".{target.name}-stale-{os.getpid()}")  # a leftover without marker: not ours to keep
    try:
        os.rename(target, stale)
        shutil.rmtree(stale, ignore_errors=True)
        os.rename(tree, target)
    except OSError as exc:
        if not (target / _MARKER).is_file():
            raise EngineUnavailable(f"cannot publish the extracted wheel at {target}: {exc}") from exc


# ------------------------------------------------------------------------------------------------------- layouts


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where one engine version keeps the replay path, and how it names things."""

    name: str  # "nsa" | "dsa": prefix of the engine's metadata fields and backend attributes
    backend_module: str
    precompute_module: str
    seqlens_module: str  # home of compute_{name}_seqlens
    real: tuple[str, ...]  # modules executed from the wheel ("pkg.*": the whole subtree)
    jit: tuple[str, ...]  # the JIT kernel wrapper: executed only where tvm_ffi is importable, else ImportError
    backend: str
    multistep: str
    metadata: str
    flashmla: str
    page_size_attr: str  # the backend attribute holding the page size of real_page_table
    draft_extend: str  # ForwardMode member that "draft_extend" names
    context_pad: int  # page-table columns beyond max_context_len + draft_tokens
    int32_seq_lens: bool  # graph runners keep seq_lens int32: decode's cache_seqlens_int32 is a view of them
    foreign: tuple[str, ...] = ()  # GPU-only packages a real module imports at load: stubbed unless installed
    hoisted: tuple[tuple[str, str, str], ...] = ()  # (attribute, module, name) the engine's __init__ binds


_ATTN = "sglang.srt.layers.attention"
_COMMON = ("sglang.srt.environ", "sglang.srt.model_executor.forward_batch_info", f"{_ATTN}.base_attn_backend")

_LAYOUTS = {
    "0.5.10": _Layout(
        name="nsa", backend_module=f"{_ATTN}.nsa_backend", precompute_module=f"{_ATTN}.nsa.nsa_backend_mtp_precompute",
        seqlens_module=f"{_ATTN}.nsa.utils",
        real=(*_COMMON, f"{_ATTN}.nsa_backend", f"{_ATTN}.nsa.nsa_backend_mtp_precompute", f"{_ATTN}.nsa.utils"),
        jit=("sglang.jit_kernel.fused_metadata_copy", "sglang.jit_kernel.utils"),
        backend="NativeSparseAttnBackend", multistep="NativeSparseAttnMultiStepBackend", metadata="NSAMetadata",
        flashmla="NSAFlashMLAMetadata", page_size_attr="real_page_size", draft_extend="DRAFT_EXTEND",
        context_pad=0, int32_seq_lens=True, foreign=("sgl_kernel",),
    ),
    "0.5.23": _Layout(
        name="dsa", backend_module=f"{_ATTN}.dsa_backend", precompute_module=f"{_ATTN}.dsa.dsa_backend_mtp_precompute",
        seqlens_module=f"{_ATTN}.dsa.utils",
        real=(*_COMMON, f"{_ATTN}.dsa_backend", f"{_ATTN}.dsa.dsa_metadata_manager",
              f"{_ATTN}.dsa.dsa_backend_mtp_precompute", f"{_ATTN}.dsa.dsa_backend_kpool", f"{_ATTN}.dsa.utils"),
        jit=("sglang.kernels.ops.attention.dsa.fused_metadata_copy", "sglang.kernels.jit", "sglang.kernels.jit.*"),
        backend="DeepseekSparseAttnBackend", multistep="DeepseekSparseAttnMultiStepBackend", metadata="DSAMetadata",
        flashmla="DSAFlashMLAMetadata", page_size_attr="physical_page_size", draft_extend="DRAFT_EXTEND_V2",
        context_pad=4, int32_seq_lens=False,
        hoisted=(
            ("_is_in_breakable_cuda_graph",
             "sglang.srt.model_executor.runner_backend_utils.breakable_cuda_graph.context",
             "is_in_breakable_cuda_graph"),
            ("_is_in_tc_piecewise_cuda_graph", "sglang.srt.model_executor.runner_backend_utils.tc_piecewise_cuda_graph",
             "is_in_tc_piecewise_cuda_graph"),
            ("_get_device_sm", "sglang.srt.utils", "get_device_sm"),
            ("_is_blackwell", "sglang.srt.utils", "is_blackwell"),
        ),
    ),
}


def _matches(fullname: str, patterns: Sequence[str]) -> bool:
    return any(fullname == p or (p.endswith(".*") and fullname.startswith(p[:-1])) for p in patterns)


def _is_engine_module(fullname: str) -> bool:
    return fullname == "sglang" or fullname.startswith("sglang.")


# --------------------------------------------------------------------------------------------------------- stubs


def _false(*_args: Any, **_kwargs: Any) -> bool:
    """Every ``is_*`` probe of a stubbed module (is_cuda, is_hip, is_npu, is_blackwell, ...) answers no: the replay
    then takes its portable path, on a GPU too (no DeepGEMM schedule refresh, no HIP branches)."""
    return False


def _decorates(args: tuple, kwargs: dict) -> bool:
    """A call that is a decoration: a single function or class and nothing else (it is then returned as is)."""
    return len(args) == 1 and not kwargs and (inspect.isfunction(args[0]) or inspect.isclass(args[0]))


class _Anything:
    """What calling a stand-in returns: any attribute or call answers with another; false, empty, a no-op context."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _ANYTHING

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return args[0] if _decorates(args, kwargs) else _ANYTHING

    def __bool__(self) -> bool:
        return False

    def __iter__(self) -> Iterator[Any]:
        return iter(())

    def __enter__(self) -> Any:
        return _ANYTHING

    def __exit__(self, *_exc: Any) -> None:
        return None


_ANYTHING = _Anything()


class _StandInMeta(type):
    """Metaclass of stand-in classes: on a stand-in itself (not on a real subclass) any class attribute exists and a
    call decorates transparently or returns ``_Anything``; subscripting and ``|`` give the class back."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls.__dict__.get("_stand_in"):
            return args[0] if _decorates(args, kwargs) else _ANYTHING
        return super().__call__(*args, **kwargs)

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__") or not cls.__dict__.get("_stand_in"):
            raise AttributeError(name)
        value = _stand_in(name, cls.__module__)
        setattr(cls, name, value)
        return value

    def __getitem__(cls, _item: Any) -> Any:
        return cls

    def __or__(cls, _other: Any) -> Any:
        return cls

    __ror__ = __or__


class _StandIn(metaclass=_StandInMeta):
    """Base of stand-in classes; a real engine class may derive from one (its instances stay strict)."""

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        pass

    def __init_subclass__(cls, **_kwargs: Any) -> None:
        pass


def _stand_in(name: str, module: str) -> type:
    return _StandInMeta(name, (_StandIn,), {"__module__": module, "__qualname__": name, "_stand_in": True})


class _StubModule(types.ModuleType):
    """An engine module that is not executed. A missing attribute is a submodule when the wheel has one of that
    name, ``False``-answering for ``is_*`` probes, and a fresh stand-in class otherwise (kept once asked for)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        source = _FINDER.source
        if source is not None and source.locate(f"{self.__name__}.{name}") is not None:
            value: Any = importlib.import_module(f"{self.__name__}.{name}")
        elif name.startswith("is_"):
            value = _false
        else:
            value = _stand_in(name, self.__name__)
        setattr(self, name, value)
        return value


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _StubModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        return None


_STUB_LOADER = _StubLoader()


# -------------------------------------------------------------------------------------------------------- finder


@dataclasses.dataclass(frozen=True)
class _Source:
    """One extracted wheel and what of it runs for real."""

    root: Path
    layout: _Layout
    jit: bool  # tvm_ffi is importable: the JIT wrapper modules run for real

    def locate(self, fullname: str) -> Path | None:
        """The module's file (package ``__init__.py``), its directory, or None if the wheel has no such module."""
        rel = Path(*fullname.split("."))
        for candidate in (self.root / rel / "__init__.py", self.root / rel.with_suffix(".py")):
            if candidate.is_file():
                return candidate
        if (self.root / rel).is_dir():
            return self.root / rel
        parent = self.root / rel.parent
        compiled = parent.is_dir() and any(parent.glob(f"{rel.name}.*.so"))
        return parent if compiled else None  # compiled extensions (cp311) exist, and are only ever stubbed

    def find_spec(self, fullname: str) -> importlib.machinery.ModuleSpec | None:
        location = self.locate(fullname)
        if location is None:
            return None
        if _matches(fullname, self.layout.jit) and not self.jit:
            raise ModuleNotFoundError(f"{fullname}: the engine's JIT kernel needs tvm_ffi, which is not installed",
                                      name="tvm_ffi")
        real = _matches(fullname, self.layout.real) or _matches(fullname, self.layout.jit)
        if real and location.suffix == ".py":
            package = location.name == "__init__.py"
            # An empty __path__ keeps the default path finder out: this finder decides about every submodule.
            return importlib.util.spec_from_file_location(fullname, location,
                                                          submodule_search_locations=[] if package else None)
        return importlib.machinery.ModuleSpec(fullname, _STUB_LOADER, is_package=True)


class _Finder(importlib.abc.MetaPathFinder):
    """Serves ``sglang`` and ``sglang.*`` from the active version's wheel. Appended at the end of ``sys.meta_path``:
    finders placed earlier see every import first."""

    def __init__(self) -> None:
        self.source: _Source | None = None

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if self.source is None:
            return None
        if _is_engine_module(fullname):
            return self.source.find_spec(fullname)
        if fullname.partition(".")[0] in self.source.layout.foreign:
            return importlib.machinery.ModuleSpec(fullname, _STUB_LOADER, is_package=True)
        return None


_FINDER = _Finder()
_ENGINES: dict[str, Engine] = {}
_UNAVAILABLE: dict[str, EngineUnavailable] = {}  # per process: a failed download is not retried by every test
_ACTIVE: Engine | None = None


def _take_engine_modules() -> dict[str, types.ModuleType]:
    """Remove every ``sglang*`` module (and stubbed GPU-only package) from ``sys.modules`` and return them."""
    taken = {name: module for name, module in sys.modules.items()
             if _is_engine_module(name) or isinstance(module, _StubModule)}
    for name in taken:
        del sys.modules[name]
    return taken


def _activate(engine: Engine | None) -> None:
    """Make ``engine``'s modules the ones ``sys.modules`` holds (None: none). The outgoing engine keeps what it had
    loaded, lazily imported modules included, so switching back restores the very same module objects."""
    global _ACTIVE
    if _FINDER not in sys.meta_path:
        sys.meta_path.append(_FINDER)
    if _ACTIVE is engine:
        return
    taken = _take_engine_modules()
    if _ACTIVE is not None:
        _ACTIVE._modules = taken
    _ACTIVE = engine
    _FINDER.source = engine._source if engine is not None else None
    if engine is not None:
        sys.modules.update(engine._modules)


def load(version: str) -> Engine:
    """The engine of ``version`` (one of ``VERSIONS``), its modules active in ``sys.modules``. Downloads the wheel the
    first time; cached per process and version. Raises ``EngineUnavailable`` when the wheel cannot be had (and
    again at once for the rest of the process: no test waits on the registry twice)."""
    if version not in _LAYOUTS:
        raise ValueError(f"unknown sglang version {version!r}; known: {', '.join(VERSIONS)}")
    engine = _ENGINES.get(version)
    if engine is None:
        if version in _UNAVAILABLE:
            raise _UNAVAILABLE[version]
        try:
            root = engine_source(version)
        except EngineUnavailable as exc:
            _UNAVAILABLE[version] = exc
            raise
        engine = _ENGINES[version] = Engine(version, root)
    _activate(engine)
    return engine


# -------------------------------------------------------------------------------------------------------- engine


@dataclasses.dataclass(frozen=True)
class _Geometry:
    """What a backend's graph buffers and the precomputed metadata refreshing them must agree on."""

    page_size: int
    draft_tokens: int
    width: int  # page_table_1 columns: the engine's req_to_token width
    flashmla: bool
    device: torch.device

    @property
    def real_cols(self) -> int:
        return math.ceil(self.width / self.page_size)


class _Poison:
    """Seeded random non-zero int32 buffers: zeros would hide a copy of zeros, a pattern would hide a shifted one."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.device = device

    def __call__(self, *shape: int) -> torch.Tensor:
        return torch.randint(1, 2**31 - 1, shape, generator=self.gen, dtype=torch.int32).to(self.device)


def _runner_seq_lens(bs_list: Sequence[int], buffer: torch.Tensor) -> dict[int, torch.Tensor]:
    """0.5.10's graph runners keep ``seq_lens`` int32, so the capture's ``seq_lens.to(torch.int32)`` returns the
    runner's ``seq_lens[:bs]`` itself: decode's ``cache_seqlens_int32`` (and ``seqlens_expanded``) are that view,
    one per bs, shared by every backend the runner captures (all draft backends of a multi-step backend)."""
    return {bs: buffer[:bs] for bs in sorted(set(bs_list))}


def _mode_name(mode: Any) -> str:
    return mode.lower() if isinstance(mode, str) else mode.name.lower()


class Engine:
    """One sglang version's replay code loaded from its wheel, with builders for exactly the state it reads."""

    version: str
    layout: str  # "nsa" (0.5.10) or "dsa" (0.5.23)
    Backend: type
    MultiStepBackend: type
    Metadata: type
    FlashMLAMetadata: type
    Precomputed: type
    ForwardMode: type

    def __init__(self, version: str, root: Path) -> None:
        layout = _LAYOUTS[version]
        self.version, self.layout, self._layout = version, layout.name, layout
        self._source = _Source(root, layout, jit=importlib.util.find_spec("tvm_ffi") is not None)
        self._modules: dict[str, types.ModuleType] = {}
        _activate(self)
        try:
            self._bind(layout)
        except BaseException:
            _take_engine_modules()
            _activate(None)
            raise

    def _bind(self, layout: _Layout) -> None:
        if not isinstance(importlib.import_module("sglang"), _StubModule):
            raise EngineUnavailable(f"an installed sglang package shadows the {self.version} wheel; uninstall it")
        backend = importlib.import_module(layout.backend_module)
        precompute = importlib.import_module(layout.precompute_module)
        self.Backend = getattr(backend, layout.backend)
        self.MultiStepBackend = getattr(backend, layout.multistep)
        self.Metadata = getattr(backend, layout.metadata)
        self.FlashMLAMetadata = getattr(backend, layout.flashmla)
        self.Precomputed = precompute.PrecomputedMetadata
        self.ForwardMode = importlib.import_module("sglang.srt.model_executor.forward_batch_info").ForwardMode
        self._compute_cu_seqlens = precompute.compute_cu_seqlens
        self._compute_seqlens = getattr(importlib.import_module(layout.seqlens_module),
                                        f"compute_{layout.name}_seqlens")

    def __repr__(self) -> str:
        return f"<sglang {self.version} engine ({self.layout}) from {self._source.root}>"

    @property
    def jit_available(self) -> bool:
        """Whether the engine's JIT copy kernel can even be imported here (tvm_ffi installed)."""
        return self._source.jit

    def module(self, name: str) -> types.ModuleType:
        """A module of this engine by dotted name (real or stub), with this version made active."""
        _activate(self)
        return importlib.import_module(name)

    def forward_mode(self, name: str) -> Any:
        """``decode``, ``idle``, ``target_verify``, ``draft_extend`` (0.5.10: DRAFT_EXTEND, 0.5.23: DRAFT_EXTEND_V2,
        its only draft extend) or ``draft_extend_v2``, as the engine's ForwardMode."""
        members = {"decode": "DECODE", "idle": "IDLE", "target_verify": "TARGET_VERIFY",
                   "draft_extend": self._layout.draft_extend, "draft_extend_v2": "DRAFT_EXTEND_V2"}
        key = _mode_name(name)
        if key not in members:
            raise ValueError(f"unknown forward mode {name!r}; known: {', '.join(members)}")
        return self.ForwardMode[members[key]]

    def _geometry(self, page_size: int, draft_tokens: int, max_context_len: int, flashmla: bool,
                  device: Any) -> _Geometry:
        width = max_context_len + self._layout.context_pad + draft_tokens
        return _Geometry(page_size, draft_tokens, width, flashmla, torch.device(device))

    # ------------------------------------------------------------------------------------------------ backends

    def make_backend(self, bs_list: Sequence[int], *, page_size: int = 64, flashmla: bool = False,
                     real_page_table: bool = True, max_context_len: int = 256, draft_tokens: int = 4,
                     device: Any = "cpu", seed: int = 0, speculative_step_id: int = 0,
                     mode: str = "decode") -> Any:
        """A ``Backend`` built without its ``__init__``: the attributes the replay reads, and
        ``decode_cuda_graph_metadata[bs]`` for every bs as the engine captures it in ``mode``.

        ``mode`` (an addition to the brief): decode/idle capture ``bs`` rows, target_verify and draft extends
        ``bs * draft_tokens``; the engine captures one mode per backend and the decode copies do not fit a
        verify-shaped metadata (see the report). ``real_page_table`` does not change the backend: the engine's
        metadata always has a real page table (``page_table_1`` itself at page size 1); whether it is refreshed
        is the precomputed side's (``make_precomputed(real_page_table=...)``).
        """
        del real_page_table
        _activate(self)
        geometry = self._geometry(page_size, draft_tokens, max_context_len, flashmla, device)
        return self._backend(bs_list, geometry, _Poison(seed, geometry.device), mode,
                             speculative_step_id=speculative_step_id, speculative_num_steps=0, seq_lens=None)

    def _backend(self, bs_list: Sequence[int], geometry: _Geometry, poison: _Poison, mode: str, *,
                 speculative_step_id: int, speculative_num_steps: int, seq_lens: dict[int, torch.Tensor] | None) -> Any:
        backend = self.Backend.__new__(self.Backend)
        self._set_attributes(backend, geometry, speculative_step_id, speculative_num_steps)
        backend.decode_cuda_graph_metadata = self._graph_metadata(bs_list, geometry, poison, mode, seq_lens)
        return backend

    def _set_attributes(self, backend: Any, geometry: _Geometry, step_id: int, num_steps: int) -> None:
        """What ``__init__`` would have set and the replay reads: the prefill-impl reset's inputs (auto-select on an
        fp8 KV cache, so the reset visibly rewrites ``*_prefill_impl``), the page size, kpool off; plus the
        geometry the engine's own precompute would read."""
        p = self._layout.name
        attrs = {
            "device": geometry.device, f"{p}_index_topk": _INDEX_TOPK,
            self._layout.page_size_attr: geometry.page_size, f"{p}_kv_cache_store_fp8": True,
            f"{p}_prefill_impl": "flashmla_auto", "enable_auto_select_prefill_impl": True,
            f"{p}_decode_impl": "flashmla_kv" if geometry.flashmla else "flashmla_sparse", "use_mha": False,
            "speculative_num_draft_tokens": geometry.draft_tokens, "speculative_step_id": step_id,
            "speculative_num_steps": num_steps,
        }
        if p == "dsa":
            attrs.update(dsa_index_kpool=1, experimental_kpool_metadata_fusion=False)
        for attr, module, name in self._layout.hoisted:
            attrs[attr] = getattr(importlib.import_module(module), name)
        for name, value in attrs.items():
            setattr(backend, name, value)

    def _graph_metadata(self, bs_list: Sequence[int], geometry: _Geometry, poison: _Poison, mode: str,
                        seq_lens: dict[int, torch.Tensor] | None) -> dict:
        """What ``init_cuda_graph_state`` and the capture (0.5.23 ``_build_forward_metadata_cuda_graph``, 0.5.10
        ``init_forward_metadata_capture_cuda_graph``) leave for ``bs_list``: the engine's shared base buffers
        sliced per bs, and the tensors it allocates per bs as views of their own larger buffer (so a write past a
        view lands in a snapshot). Every buffer poisoned; bases hold ``max(bs_list) * draft_tokens`` rows plus a
        guard row, the most any mode captures."""
        decode = _mode_name(mode) in ("decode", "idle")
        self.forward_mode(mode)  # validates the name
        cap = max(bs_list) * geometry.draft_tokens + 1
        graph: dict[Any, Any] = {"cache_seqlens": poison(cap), "cu_seqlens_q": poison(cap + 1),
                                 "cu_seqlens_k": poison(cap + 1)}
        if self._layout.name == "dsa":
            graph["real_page_table"] = None  # allocated only for fused decode graphs without the wide table
        graph["page_table"] = poison(cap, geometry.width)
        graph["flashmla_metadata"] = (
            self.FlashMLAMetadata(flashmla_metadata=poison(_SM_PARTS, _TILE_FIELDS), num_splits=poison(cap + 1))
            if geometry.flashmla else None)
        arange = poison(cap + 1)  # the backend's _arange_buf: {p}_cu_seqlens_q of every bs are views of it
        if decode and self._layout.int32_seq_lens and seq_lens is None:
            seq_lens = _runner_seq_lens(bs_list, poison(cap))
        for bs in sorted(set(bs_list)):
            graph[bs] = self._capture(bs, decode, graph, arange, seq_lens if decode else None, geometry, poison)
        return graph

    def _capture(self, bs: int, decode: bool, graph: dict, arange: torch.Tensor, seq_lens: dict | None,
                 geometry: _Geometry, poison: _Poison) -> Any:
        cap = graph["page_table"].shape[0]
        rows = bs if decode else bs * geometry.draft_tokens
        page_table_1 = graph["page_table"][:rows, :]
        cache_seqlens = seq_lens[bs] if seq_lens is not None else poison(cap)[:bs]
        if decode:
            cu_seqlens_q, seqlens_expanded = graph["cu_seqlens_q"][: bs + 1], cache_seqlens
        else:
            cu_seqlens_q, seqlens_expanded = poison(cap + 1)[: rows + 1], poison(cap)[:rows]
        real = page_table_1 if geometry.page_size == 1 else poison(cap, geometry.real_cols)[:rows]
        flashmla = graph["flashmla_metadata"]
        p = self._layout.name
        return self.Metadata(
            page_size=geometry.page_size, cache_seqlens_int32=cache_seqlens, max_seq_len_q=1,
            max_seq_len_k=geometry.width, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=poison(cap + 1)[: bs + 1],
            page_table_1=page_table_1, real_page_table=real,
            **{f"{p}_cache_seqlens_int32": poison(cap)[:rows], f"{p}_cu_seqlens_q": arange[: rows + 1],
               f"{p}_cu_seqlens_k": poison(cap + 1)[: rows + 1], f"{p}_extend_seq_lens_list": [1] * rows,
               f"{p}_seqlens_expanded": seqlens_expanded},
            flashmla_metadata=flashmla.slice(slice(0, rows + 1)) if flashmla is not None else None,
        )

    def capturing_backend(self, bs_list: Sequence[int], *, mode: str = "decode", **geometry: Any) -> tuple:
        """``(cls, backend, capture)``: a backend whose class is ``Backend`` with its capture method (0.5.23
        ``_build_forward_metadata_cuda_graph``, 0.5.10 ``init_forward_metadata_capture_cuda_graph``) standing in
        under the same name and signature — building the real buffers needs a model — handing over the buffers
        ``make_backend`` builds, one batch size per call, as the engine's capture does. ``capture(bs)`` calls it
        the way the engine's graph runner does; ``nsa.install(cls)`` patches ``cls`` alone."""
        name = next(n for n in ("_build_forward_metadata_cuda_graph", "init_forward_metadata_capture_cuda_graph")
                    if hasattr(self.Backend, n))
        signature = inspect.signature(getattr(self.Backend, name))
        backend = self.make_backend(bs_list, mode=mode, **geometry)
        buffers, backend.decode_cuda_graph_metadata = backend.decode_cuda_graph_metadata, {}

        def capture_stand_in(self, *args, **kwargs):
            bs = signature.bind(self, *args, **kwargs).arguments["bs"]
            self.decode_cuda_graph_metadata[bs] = buffers[bs]
        capture_stand_in.__signature__ = signature
        cls = type(f"Capturing{self.Backend.__name__}", (self.Backend,), {name: capture_stand_in})
        backend.__class__ = cls
        required = [p for p in list(signature.parameters)[1:]
                    if signature.parameters[p].default is inspect.Parameter.empty]
        forward_mode = self.forward_mode(mode)

        def capture(bs: int) -> None:
            getattr(backend, name)(**{**dict.fromkeys(required), "bs": bs, "forward_mode": forward_mode})
        return cls, backend, capture

    def make_multistep(self, n_backends: int, bs_list: Sequence[int], *, page_size: int = 64,
                       flashmla: bool = False, real_page_table: bool = True, max_context_len: int = 256,
                       draft_tokens: int = 4, device: Any = "cpu", seed: int = 0, speculative_step_id: int = 0,
                       mode: str = "decode") -> Any:
        """A ``MultiStepBackend`` (speculative_num_steps = n_backends + 1) over ``n_backends`` draft backends
        captured in decode, as the engine does; backend i is seeded ``seed + i``. In 0.5.10 every draft backend's
        ``cache_seqlens_int32`` at a bs is one and the same tensor, the draft runner's ``seq_lens[:bs]``."""
        del real_page_table, speculative_step_id
        if _mode_name(mode) != "decode":
            raise ValueError("the engine captures its draft backends in decode only")
        _activate(self)
        geometry = self._geometry(page_size, draft_tokens, max_context_len, flashmla, device)
        runner = _Poison(seed + n_backends, geometry.device)  # the draft runner's own buffer, its own stream
        shared = _runner_seq_lens(bs_list, runner(max(bs_list) * draft_tokens + 1)) \
            if self._layout.int32_seq_lens else None
        multistep = self.MultiStepBackend.__new__(self.MultiStepBackend)
        multistep.topk, multistep.speculative_num_steps = 1, n_backends + 1
        multistep.attn_backends = [
            self._backend(bs_list, geometry, _Poison(seed + i, geometry.device), "decode", speculative_step_id=i,
                          speculative_num_steps=n_backends + 1, seq_lens=shared)
            for i in range(n_backends)]
        return multistep

    def run_multistep(self, multistep: Any, bs: int, precomputed: Any) -> None:
        """The engine's own multi-step replay entry, with ``attn_backends[0]._precompute_replay_metadata`` answering
        ``precomputed`` (the precompute is not under test). 0.5.10 runs with its MTP-precompute switch on."""
        _activate(self)
        first = multistep.attn_backends[0]
        batch = self._forward_batch(bs, precomputed)
        first._precompute_replay_metadata = lambda *_args, **_kwargs: precomputed
        try:
            if self._layout.name == "dsa":
                multistep.init_forward_metadata_out_graph(batch)
            else:
                with _env("SGLANG_NSA_ENABLE_MTP_PRECOMPUTE_METADATA", "true"):
                    multistep.init_forward_metadata_replay_cuda_graph(batch, bs)
        finally:
            del first._precompute_replay_metadata

    def _forward_batch(self, bs: int, precomputed: Any) -> types.SimpleNamespace:
        seq_lens = precomputed.cache_seqlens
        pool = getattr(precomputed, "req_pool_indices", None)
        return types.SimpleNamespace(
            batch_size=bs, forward_mode=self.ForwardMode.DECODE, seq_lens=seq_lens, seq_lens_cpu=seq_lens.cpu(),
            seq_lens_sum=int(seq_lens.sum()), spec_info=None, out_cache_loc=None,
            req_pool_indices=pool if pool is not None else torch.arange(bs, device=seq_lens.device))

    # --------------------------------------------------------------------------------------------- precomputed

    def make_precomputed(self, bs: int, mode: str, max_len: int, *, page_size: int = 64, flashmla: bool = False,
                         draft_tokens: int = 4, max_context_len: int = 256, device: Any = "cpu", seed: int = 0,
                         real_page_table: bool = True) -> Any:
        """The engine's ``PrecomputedMetadata`` for ``bs`` requests in ``mode``, as ``_precompute_*_mode`` builds
        it (the engine's own cu_seqlens/seqlens/real-table helpers compute the derived fields), random but
        consistent. ``max_len`` is the page-table column count copied in every mode (decode: ``max_len``, else
        ``max_seqlen_k``): the longest request reaches it exactly. ``real_page_table=False`` (an addition) leaves
        ``real_page_table`` None at page size > 1, a state the engine's precompute never produces.
        ``draft_extend_v2`` (and 0.5.23's ``draft_extend``) has no engine precompute; it is built with the static
        shape the 0.5.23 draft-extend replay uses (every request extends by ``draft_tokens``)."""
        del max_context_len  # the copy reads only max_len columns; kept for signature symmetry with make_backend
        _activate(self)
        forward_mode = self.forward_mode(mode)
        gen = torch.Generator().manual_seed(seed)
        extend = self._extend_lengths(bs, forward_mode, draft_tokens, gen)
        seq_lens = self._seq_lens(bs, max_len, forward_mode, extend, draft_tokens, gen)
        table = self._request_pages(bs, max_len, page_size, gen)
        cache_seqlens = (seq_lens + draft_tokens if forward_mode.name == "TARGET_VERIFY" else seq_lens).int()
        if extend is None:
            page_indices, seqlens_expanded = table, cache_seqlens
        else:
            page_indices = table.repeat_interleave(extend, dim=0)
            seqlens_expanded = torch.cat([torch.arange(int(kv) - int(q) + 1, int(kv) + 1, dtype=torch.int32)
                                          for q, kv in zip(extend, cache_seqlens)])
        return self._precomputed(forward_mode, max_len, cache_seqlens, page_indices, seqlens_expanded,
                                 page_size=page_size if real_page_table else 1, flashmla=flashmla, gen=gen,
                                 device=torch.device(device))

    def _extend_lengths(self, bs: int, forward_mode: Any, draft_tokens: int, gen: torch.Generator) -> Any:
        """Rows per request beyond decode: draft_tokens in verify and V2 draft extend, accept lengths in
        [1, draft_tokens] in 0.5.10's DRAFT_EXTEND; None in decode."""
        name = forward_mode.name
        if name in ("DECODE", "IDLE"):
            return None
        if name == "DRAFT_EXTEND":
            return torch.randint(1, draft_tokens + 1, (bs,), generator=gen)
        return torch.full((bs,), draft_tokens, dtype=torch.int64)

    @staticmethod
    def _seq_lens(bs: int, max_len: int, forward_mode: Any, extend: Any, draft_tokens: int,
                  gen: torch.Generator) -> torch.Tensor:
        """Request lengths whose longest reaches ``max_len`` columns (verify adds draft_tokens on top)."""
        top = max_len - draft_tokens if forward_mode.name == "TARGET_VERIFY" else max_len
        low = 1 if extend is None or forward_mode.name == "TARGET_VERIFY" else int(extend.max())
        if top < low:
            raise ValueError(f"max_len={max_len} is too short for {forward_mode.name} with {draft_tokens} tokens")
        seq_lens = torch.randint(low, top + 1, (bs,), generator=gen)
        seq_lens[int(torch.randint(0, bs, (1,), generator=gen))] = top
        return seq_lens

    @staticmethod
    def _request_pages(bs: int, cols: int, page_size: int, gen: torch.Generator) -> torch.Tensor:
        """req_to_token rows: whole pages of consecutive slots, as the allocator hands them out."""
        pages = torch.randint(0, _POOL_SLOTS // page_size, (bs, math.ceil(cols / page_size)), generator=gen)
        slots = pages.repeat_interleave(page_size, dim=1)[:, :cols] * page_size + torch.arange(cols) % page_size
        return slots.int()

    def _precomputed(self, forward_mode: Any, max_len: int, cache_seqlens: torch.Tensor, page_indices: torch.Tensor,
                     seqlens_expanded: torch.Tensor, *, page_size: int, flashmla: bool, gen: torch.Generator,
                     device: torch.device) -> Any:
        p = self._layout.name
        clamped = self._compute_seqlens(seqlens_expanded, _INDEX_TOPK)
        size = seqlens_expanded.shape[0]
        transform = self.Backend._transform_table_1_to_real  # reads only the backend's page size
        real = transform(types.SimpleNamespace(**{self._layout.page_size_attr: page_size}), page_indices) \
            if page_size > 1 else None
        values = _to_device({
            "cache_seqlens": cache_seqlens, "cu_seqlens_k": self._compute_cu_seqlens(cache_seqlens),
            "req_pool_indices": torch.randperm(4 * len(cache_seqlens) + 8, generator=gen)[: len(cache_seqlens)],
            "page_indices": page_indices.contiguous(), "real_page_table": real,
            "seqlens_expanded": seqlens_expanded, f"{p}_cache_seqlens": clamped,
            f"{p}_cu_seqlens_k": self._compute_cu_seqlens(clamped), "seqlens_expanded_size": size,
            "max_len": -1 if forward_mode.name == "TARGET_VERIFY" else max_len, "max_seqlen_k": max_len,
            "flashmla_metadata": self._flashmla_source(size, gen) if flashmla else None,
        }, device)
        names = {field.name for field in dataclasses.fields(self.Precomputed)}
        return self.Precomputed(**{k: v for k, v in values.items() if k in names})

    def _flashmla_source(self, size: int, gen: torch.Generator) -> Any:
        """``get_mla_metadata``'s output shape: a tile-scheduler table shaped like the graph's, ``num_splits``
        a running split count over ``size`` query rows."""
        splits = torch.cat([torch.zeros(1, dtype=torch.int64), torch.randint(1, 4, (size,), generator=gen)])
        return self.FlashMLAMetadata(
            flashmla_metadata=torch.randint(0, 1 << 16, (_SM_PARTS, _TILE_FIELDS), generator=gen, dtype=torch.int32),
            num_splits=splits.cumsum(0).int())

    # ------------------------------------------------------------------------------------------------ snapshot

    def snapshot(self, backend: Any) -> dict[str, Any]:
        """Everything the replay may touch, comparable with ``snapshot_diff``: each distinct buffer reachable from
        ``decode_cuda_graph_metadata`` cloned whole (named by the first path reaching it), each view's
        ``(buffer, offset, shape, stride, dtype)`` under ``path@``, the metadata's plain fields, the backend's plain
        attributes under ``backend.*`` and ``forward_metadata`` as the bs key it is (``unset``/``foreign``)."""
        graph = backend.decode_cuda_graph_metadata
        out: dict[str, Any] = {}
        names: dict[tuple, str] = {}
        keys = [k for k in graph if isinstance(k, str)] + sorted(k for k in graph if not isinstance(k, str))
        for key in keys:
            _walk(key if isinstance(key, str) else f"[{key}]", graph[key], names, out)
        current = backend.__dict__.get("forward_metadata")
        out["forward_metadata"] = "unset" if current is None else next(
            (k for k in keys if not isinstance(k, str) and graph[k] is current), "foreign")
        for name, value in sorted(vars(backend).items()):
            if isinstance(value, (bool, int, float, str, type(None))):
                out[f"backend.{name}"] = value
        return out


def _storage_key(tensor: torch.Tensor) -> tuple:
    storage = tensor.untyped_storage()
    return tensor.device.type, tensor.device.index, storage.data_ptr(), storage.nbytes()


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole buffer behind a view: its base when that covers the storage, else the storage as flat elements."""
    base = tensor._base if tensor._base is not None else tensor
    nbytes = tensor.untyped_storage().nbytes()
    if base.storage_offset() == 0 and base.is_contiguous() and base.numel() * base.element_size() == nbytes:
        return base
    return tensor.new_empty(0).set_(tensor.untyped_storage(), 0, (nbytes // tensor.element_size(),))


def _walk(path: str, value: Any, names: dict[tuple, str], out: dict[str, Any]) -> None:
    if isinstance(value, torch.Tensor):
        key = _storage_key(value)
        if key not in names:
            names[key] = path
            out[path] = _whole(value).detach().clone()
        out[f"{path}@"] = (names[key], value.storage_offset(), tuple(value.shape), value.stride(), str(value.dtype))
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            _walk(f"{path}.{field.name}", getattr(value, field.name), names, out)
    elif isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        for i, item in enumerate(value):
            _walk(f"{path}[{i}]", item, names, out)
    else:
        out[path] = tuple(value) if isinstance(value, list) else value


def snapshot_diff(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two snapshots (tensors compared exactly), with a short reason each."""
    diffs = [f"{k}: only in first" for k in before.keys() - after.keys()]
    diffs += [f"{k}: only in second" for k in after.keys() - before.keys()]
    for key in before.keys() & after.keys():
        a, b = before[key], after[key]
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and \
                a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())
            if not same:
                diffs.append(f"{key}: tensors differ")
        elif a != b:
            diffs.append(f"{key}: {a!r} != {b!r}")
    return sorted(diffs)


def _to_device(values: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors (FlashMLA pairs included) moved to ``device``; one tensor under two names stays one tensor."""
    moved: dict[int, Any] = {}

    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return moved.setdefault(id(value), value.to(device))
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return type(value)(**{f.name: move(getattr(value, f.name)) for f in dataclasses.fields(value)})
        return value

    return {key: move(value) for key, value in values.items()}


@contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the duration (the engine's envs read os.environ at .get())."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved
