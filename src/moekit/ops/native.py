"""Native decode kernels (``native_decode.c``): few rows per expert times that expert's weight, for CPU decode.

BLAS runs a one-row product (GEMV) on one core and a 2-16-row one through a packing GEMM; on the 2-core machine of
docs/performance.md both read the weight at about half the memory bandwidth. These kernels read each touched
expert's weight once, spread over torch's threads, at close to a streaming read.

The C source is compiled on first use with the system's C compiler (``$CC`` or ``cc``, ``-O3 -march=native
-fopenmp``) into a cache directory (``$MOEKIT_CACHE_DIR``, default ``~/.cache/moekit``), keyed by the source, the
compiler and the CPU's flags; loading uses the OpenMP runtime torch already loaded. Without a compiler, or with
``MOEKIT_NATIVE=0``, :func:`available` is False and callers keep their torch path (one warning says why).

:func:`grouped_rows` and :func:`ffn` are the entry points (float32 or bfloat16 CPU tensors, one dtype per call, no
autograd; float32 arithmetic, a bfloat16 result rounded once); :func:`takes_rows` and :func:`takes_weight` say when
they apply.
"""

from __future__ import annotations

import array
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

MAX_ROWS = 16  # rows per group (native_decode.c: MAX_ROWS)
# below this many weight bytes in one call, one thread: waking torch's second OpenMP thread costs ~50 us on the
# development VM (docs/performance.md), more than it saves on a cache-sized weight
_PARALLEL_MIN_BYTES = 1 << 18
_SOURCE = Path(__file__).with_name("native_decode.c")
# included by the source: the first three once per storage type, native_gemm.h (float32) once
_HEADERS = tuple(Path(__file__).with_name(n) for n in ("native_kernels.h", "native_combine.h", "native_glu.h",
                                                       "native_gemm.h"))
DTYPES = (torch.float32, torch.bfloat16)  # storage types of x, y, weights and biases (all the same per call)
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_lib: ctypes.CDLL | None = None
_empty, _get_num_threads = torch.empty, torch.get_num_threads  # (bound once, for the decode call)
_failed: str | None = None


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line of /proc/cpuinfo (``flags``, ``vendor_id``), or None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_flags() -> str:
    flags = _cpuinfo("flags")
    return platform.processor() if flags is None else flags


def _cpu_vendor() -> str:
    """/proc/cpuinfo's ``vendor_id`` (``GenuineIntel``, ``AuthenticAMD``), or "" where there is none."""
    return _cpuinfo("vendor_id") or ""


def _cache_dir() -> Path:
    root = os.environ.get("MOEKIT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "moekit")
    return Path(root) / "native"


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC or install gcc)")
    source = _SOURCE.read_bytes() + b"".join(h.read_bytes() for h in _HEADERS)
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno"]
    if _cpu_vendor() == "AuthenticAMD":  # the decode read's prefetch as measured best there (native_decode.c)
        flags.append("-DMOEKIT_CPU_AMD")
    libs = ["-lm"]
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), str(version).encode(),
                                     _cpu_flags().encode(), platform.machine().encode()])).hexdigest()[:16]
    target = _cache_dir() / f"native_decode-{key}.so"

    def compile_into_cache() -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            res = subprocess.run([cc, *flags, str(_SOURCE), "-o", str(out), *libs], capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"{cc} failed on {_SOURCE.name}: {res.stderr.strip()[-2000:]}")
            os.replace(out, target)  # atomic: a concurrent build or a crash never leaves a partial library

    if not target.exists():
        compile_into_cache()
    try:
        lib = ctypes.CDLL(str(target))
    except OSError:  # a damaged cache entry (not one of ours: ours are written atomically): build it again, once
        target.unlink(missing_ok=True)
        compile_into_cache()
        lib = ctypes.CDLL(str(target))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    groups = [i64, ptr, ptr, ptr, i64, i64, i64]  # G, experts, offsets, rows, R, E, nrows
    for suffix in _SUFFIX.values():
        for kind in ("rows", "cols"):
            fn = getattr(lib, f"moekit_{kind}_{suffix}")
            fn.restype = ctypes.c_int
            fn.argtypes = [ptr, i64, ptr, i64, *groups, ptr, i64, i64, i64, i64, ptr, i64, ctypes.c_int]
        fn = getattr(lib, f"moekit_ffn_{suffix}")
        fn.restype = ctypes.c_int
        c_int, c_float = ctypes.c_int, ctypes.c_float
        fn.argtypes = [ptr, i64, ptr, i64, *groups, ptr, i64, i64, c_int, i64, i64, ptr, i64,
                       ptr, i64, i64, c_int, i64, ptr, i64, c_int, c_int, c_float, c_float, c_int]
        fn = getattr(lib, f"moekit_gather_sum_{suffix}")
        fn.restype = ctypes.c_int
        fn.argtypes = [ptr, i64, ptr, ptr, i64, i64, i64, ptr, i64, c_int]
        fn = getattr(lib, f"moekit_combine_backward_{suffix}")
        fn.restype = ctypes.c_int
        fn.argtypes = [ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, ptr, i64, ptr, c_int]
        fn = getattr(lib, f"moekit_swiglu_{suffix}")
        fn.restype = ctypes.c_int
        fn.argtypes = [ptr, i64, i64, i64, ptr, i64, c_int, c_int, c_float, c_float, c_int]
        fn = getattr(lib, f"moekit_swiglu_backward_{suffix}")
        fn.restype = ctypes.c_int
        fn.argtypes = [ptr, i64, ptr, i64, i64, i64, ptr, i64, c_int, c_int, c_float, c_float, c_int]
        fn = getattr(lib, f"moekit_moe_decode_args_{suffix}")
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.POINTER(_DecodeArgs), ptr, i64, ptr, i64, i64, c_int, ptr, ptr, ptr]
    lib.moekit_decode_args_size.restype = i64
    lib.moekit_decode_args_size.argtypes = []
    if lib.moekit_decode_args_size() != ctypes.sizeof(_DecodeArgs):  # one side edited without the other
        raise RuntimeError(f"struct decode_args is {lib.moekit_decode_args_size()} bytes in C but "
                           f"{ctypes.sizeof(_DecodeArgs)} in moekit.ops.native._DecodeArgs")
    lib.moekit_grouped_gemm.restype = ctypes.c_int
    lib.moekit_grouped_gemm.argtypes = [ptr, ctypes.c_int, i64, ptr, ptr, i64, ptr, i64, i64, ctypes.c_int, ptr, i64,
                                        i64, i64, i64, ctypes.c_int]
    return lib


class _DecodeArgs(ctypes.Structure):
    """native_decode.c's ``struct decode_args``: the weights' and the routing rule's arguments of a decode call,
    laid out once (:func:`prepare_moe_decode`); the fields and their order are the C struct's."""

    _i64, _ptr, _int, _float = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    _fields_ = [("D", _i64), ("wr", _ptr), ("ldr", _i64), ("br", _ptr), ("E", _i64), ("k", _i64), ("score", _int),
                ("normalize", _int), ("scale", _float), ("sel_bias", _ptr), ("n_group", _i64),
                ("topk_group", _i64), ("group_max", _int), ("w_in", _ptr), ("sE_in", _i64), ("ld_in", _i64),
                ("cols_in", _int), ("H", _i64), ("b_in", _ptr), ("sb_in", _i64), ("w2", _ptr), ("sE2", _i64),
                ("ld2", _i64), ("cols2", _int), ("Dout", _i64), ("b2", _ptr), ("sb2", _i64), ("glu", _int),
                ("act", _int), ("alpha", _float), ("limit", _float)]


def _load() -> ctypes.CDLL | None:
    global _lib, _failed
    if _lib is not None or _failed is not None:
        return _lib
    if os.environ.get("MOEKIT_NATIVE", "1") == "0":
        _failed = "disabled by MOEKIT_NATIVE=0"
        return None
    try:
        _lib = _build()
    except Exception as e:  # no compiler, a failed build, an unloadable library: keep the torch path, say why once
        _failed = f"{type(e).__name__}: {e}"
        warnings.warn(f"moekit: native decode kernels unavailable ({_failed}); decode uses torch matmuls",
                      RuntimeWarning, stacklevel=3)
    return _lib


def _require() -> ctypes.CDLL:
    """The loaded library, or a RuntimeError saying why there is none (for the entry points)."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"moekit native kernels unavailable: {_failed}")
    return lib


def available() -> bool:
    """Whether the native kernels are built and loaded (builds them on the first call)."""
    return _load() is not None


def why_unavailable() -> str | None:
    """The reason :func:`available` is False (None when it is True or not yet asked)."""
    return _failed


def takes_rows(x_ND: Tensor) -> bool:
    """Whether :func:`grouped_rows` takes these input rows: a float32 or bfloat16 CPU matrix with unit stride along
    each row, no autograd needed, and the kernels available (built on the first call)."""
    return (x_ND.dtype in DTYPES and x_ND.device.type == "cpu" and x_ND.dim() == 2 and x_ND.stride(1) == 1
            and not (x_ND.requires_grad and torch.is_grad_enabled()) and available())


def takes_weight(w_EOD: Tensor, b_EO: Tensor | None, dtype: torch.dtype) -> bool:
    """Whether :func:`grouped_rows` takes this weight and bias for inputs of ``dtype``: the same dtype (float32 or
    bfloat16), on CPU, unit stride along one of the weight's inner dims ((out, in) storage, or (in, out) seen through
    a transposed view), no autograd needed."""
    if torch.is_grad_enabled() and (w_EOD.requires_grad or (b_EO is not None and b_EO.requires_grad)):
        return False
    return takes_weight_storage(w_EOD, b_EO, dtype)


def takes_weight_storage(w_EOD: Tensor, b_EO: Tensor | None, dtype: torch.dtype) -> bool:
    """:func:`takes_weight` without the autograd check: dtype, device and layout only."""
    if w_EOD.dtype != dtype or dtype not in DTYPES or w_EOD.device.type != "cpu" or w_EOD.dim() != 3:
        return False
    if b_EO is not None and (b_EO.dtype != dtype or b_EO.dim() != 2 or b_EO.stride(1) != 1):
        return False
    return w_EOD.stride(2) == 1 or w_EOD.stride(1) == 1


def _same_dtype(where: str, x: Tensor | torch.dtype, *others: Tensor | None) -> str:
    """The kernels' suffix for the input ``x`` (or its dtype), after checking every other tensor shares it."""
    dtype = x if isinstance(x, torch.dtype) else x.dtype
    if dtype not in DTYPES:
        raise TypeError(f"moekit.ops.native.{where}: inputs must be float32 or bfloat16, got {dtype}")
    bad = [t.dtype for t in others if t is not None and t.dtype != dtype]
    if bad:
        raise TypeError(f"moekit.ops.native.{where}: every tensor must share the input's dtype {dtype}, got {bad}")
    return _SUFFIX[dtype]


ACTIVATIONS = {"silu": 0, "swish": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}  # the fused FFN's activations


def _groups(experts: list[int], offsets: list[int], rows: list[int]):
    """The groups as one int64 array (kept alive by the caller through the call) and the kernel arguments that
    locate its parts: ``(G, experts*, offsets*, rows*, R)``. The kernel checks them (:func:`_raise`)."""
    G = len(experts)
    if len(offsets) != G + 1:
        raise ValueError(f"moekit.ops.native: offsets must have one entry per group + 1, got {len(offsets)} for "
                         f"{G} groups")
    buf = array.array("q", experts)
    buf.extend(offsets)
    buf.extend(rows)
    a = buf.buffer_info()[0]
    return buf, (G, a, a + 8 * G, a + 8 * (2 * G + 1), len(rows))


def _raise(status: int, where: str, E: int, nrows: int, offsets: list[int]) -> None:
    if status == 11:
        raise ValueError(f"moekit.ops.native.{where}: offsets must run from 0 to len(rows) in order, got {offsets}")
    if status == 12:
        raise ValueError(f"moekit.ops.native.{where}: experts must lie in [0, {E}) and groups hold at most "
                         f"{MAX_ROWS} rows (offsets {offsets})")
    if status == 13:
        raise ValueError(f"moekit.ops.native.{where}: row ids must lie in [0, {nrows})")
    raise MemoryError(f"moekit.ops.native.{where}: the native kernel could not allocate its work buffers")


def _threads(nbytes: int, threads: int | None) -> int:
    if threads is not None:
        return threads
    return torch.get_num_threads() if nbytes >= _PARALLEL_MIN_BYTES else 1


def _layout(w_EOI: Tensor, where: str) -> tuple[int, int]:
    """``(ld, cols)`` of an expert weight (E, out, in): the rows layout (unit stride along ``in``; ``ld`` the stride
    of ``out``) or the cols layout (an (in, out) storage seen transposed: unit stride along ``out``)."""
    if w_EOI.stride(2) == 1:
        return w_EOI.stride(1), 0
    if w_EOI.stride(1) == 1:
        return w_EOI.stride(2), 1
    raise ValueError(f"moekit.ops.native.{where}: an expert weight needs unit stride along one of its inner dims, "
                     f"got strides {w_EOI.stride()}")


def _gating(glu: bool, activation: str, interleaved: bool, clamp: tuple[float, float] | None,
            where: str) -> tuple[int, int, float, float]:
    """The kernel's gating arguments ``(glu mode, activation, alpha, limit)``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"moekit.ops.native.{where}: activation {activation!r} has no native form; "
                         f"valid: {', '.join(ACTIVATIONS)}")
    if (interleaved or clamp is not None) and not glu:
        raise ValueError(f"moekit.ops.native.{where}: interleaved and clamp describe a gated unit (glu=True)")
    alpha, limit = (0.0, 0.0) if clamp is None else (float(clamp[0]), float(clamp[1]))
    if clamp is not None and not limit > 0:
        raise ValueError(f"moekit.ops.native.{where}: the clamp limit must be > 0, got {limit}")
    return (2 if interleaved else 1) if glu else 0, ACTIVATIONS[activation], alpha, limit


def ffn(x_ND: Tensor, w_in_EHD: Tensor, b_in_EH: Tensor | None, w2_EDF: Tensor, b2_ED: Tensor | None, glu: bool,
        activation: str, experts: list[int], offsets: list[int], rows: list[int], threads: int | None = None, *,
        interleaved: bool = False, clamp: tuple[float, float] | None = None) -> Tensor:
    """A whole expert FFN in one call, grouped as :func:`grouped_rows`: ``h = x @ w_in[e].T (+ b_in[e])``, then
    ``act(h[:, :F]) * h[:, F:]`` (``glu``, ``H = 2F``; ``interleaved``: gate and up are ``h[:, 0::2]``,
    ``h[:, 1::2]``) or ``act(h)``, then ``@ w2[e].T (+ b2[e])``. ``clamp=(alpha, limit)``: gpt-oss's clamped
    SwiGLU, ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = clamp(gate, max=limit)``. Each
    weight (E, out, in) with unit stride along ``in`` or (a transposed view) along ``out``; ``activation`` a key of
    :data:`ACTIVATIONS`."""
    lib = _require()
    N, D = x_ND.shape
    E, H, Dw = w_in_EHD.shape
    F = H // 2 if glu else H
    if Dw != D or w2_EDF.shape[0] != E or w2_EDF.shape[2] != F or (glu and H % 2):
        raise ValueError(f"moekit.ops.native.ffn: shapes do not chain: x {tuple(x_ND.shape)}, w_in "
                         f"{tuple(w_in_EHD.shape)}, w2 {tuple(w2_EDF.shape)}, glu={glu}")
    ld_in, cols_in = _layout(w_in_EHD, "ffn")
    ld2, cols2 = _layout(w2_EDF, "ffn")
    gating = _gating(glu, activation, interleaved, clamp, "ffn")
    suffix = _same_dtype("ffn", x_ND, w_in_EHD, b_in_EH, w2_EDF, b2_ED)
    keep, groups = _groups(experts, offsets, rows)
    Dout = w2_EDF.shape[1]
    y = torch.empty(N, Dout, dtype=x_ND.dtype)
    nbytes = len(experts) * (H * D + Dout * F) * x_ND.element_size()
    status = getattr(lib, f"moekit_ffn_{suffix}")(
        x_ND.data_ptr(), x_ND.stride(0), y.data_ptr(), y.stride(0), *groups, E, N,
        w_in_EHD.data_ptr(), w_in_EHD.stride(0), ld_in, cols_in, H, D,
        None if b_in_EH is None else b_in_EH.data_ptr(), 0 if b_in_EH is None else b_in_EH.stride(0),
        w2_EDF.data_ptr(), w2_EDF.stride(0), ld2, cols2, Dout,
        None if b2_ED is None else b2_ED.data_ptr(), 0 if b2_ED is None else b2_ED.stride(0),
        *gating, _threads(nbytes, threads))
    del keep  # the group arrays lived through the call
    if status:
        _raise(status, "ffn", E, N, offsets)
    return y


def grouped_rows(x_ND: Tensor, w_EOD: Tensor, b_EO: Tensor | None, experts: list[int], offsets: list[int],
                 rows: list[int], out_rows: int | None = None, threads: int | None = None) -> Tensor:
    """``y[n] = x[n] @ w_EOD[e].T (+ b_EO[e])`` for the rows ``n`` of each group: group ``g`` is expert
    ``experts[g]`` with rows ``rows[offsets[g]:offsets[g + 1]]`` (at most ``MAX_ROWS``). Returns ``y`` of shape
    (``out_rows`` or N, O); rows in no group are left uninitialised. Check :func:`takes_rows` and
    :func:`takes_weight` first."""
    lib = _require()
    N, D = x_ND.shape
    E, O, Dw = w_EOD.shape
    if Dw != D:
        raise ValueError(f"moekit.ops.native.grouped_rows: x has {D} columns but the weight takes {Dw}")
    suffix = _same_dtype("grouped_rows", x_ND, w_EOD, b_EO)
    y = torch.empty(out_rows if out_rows is not None else N, O, dtype=x_ND.dtype)
    keep, groups = _groups(experts, offsets, rows)
    cols = w_EOD.stride(2) != 1
    ldw = w_EOD.stride(2) if cols else w_EOD.stride(1)
    threads = _threads(len(experts) * O * D * x_ND.element_size(), threads)
    fn = getattr(lib, f"moekit_{'cols' if cols else 'rows'}_{suffix}")
    nrows = min(N, y.shape[0])
    status = fn(x_ND.data_ptr(), x_ND.stride(0), y.data_ptr(), y.stride(0), *groups, E, nrows,
                w_EOD.data_ptr(), w_EOD.stride(0), ldw, O, D,
                None if b_EO is None else b_EO.data_ptr(), 0 if b_EO is None else b_EO.stride(0), threads)
    del keep  # the group arrays lived through the call
    if status:
        _raise(status, "grouped_rows", E, nrows, offsets)
    return y



SCORES = {"softmax": 0, "sigmoid": 1, "topk_softmax": 2}  # moe_decode's routing rules


def moe_decode(x_TD: Tensor, w_router_ED: Tensor, b_router_E: Tensor | None, k: int, score: str, normalize: bool,
               scale: float, selection_bias_E: Tensor | None, w_in_EHD: Tensor, b_in_EH: Tensor | None,
               w2_EDF: Tensor, b2_ED: Tensor | None, glu: bool, activation: str, threads: int | None = None,
               return_routing: bool = False, groups: tuple[int, int, str] | None = None, *,
               interleaved: bool = False, clamp: tuple[float, float] | None = None, return_logits: bool = False,
               ) -> Tensor | tuple[Tensor, ...]:
    """An MoE layer's routed output for at most ``MAX_ROWS`` tokens in one call: the router's linear map, its score
    function and top-k (``score``: ``"softmax"`` over all experts, ``"sigmoid"`` per expert, or ``"topk_softmax"``:
    top-k of the logits, softmax over the k chosen), the optional selection bias (choice only, float32),
    renormalisation (``normalize``) and ``scale``, then every touched expert's FFN (as :func:`ffn`, with its weight
    layouts and gating: ``interleaved``, ``clamp``) and the weighted
    sum per token. ``groups``: ``(n_group, topk_group, "top2sum" | "max")``, DeepSeek's group-limited choice.
    Float32 arithmetic throughout (one rounding to the storage dtype at the end); ties choose the
    lower expert id. ``return_routing``: also the chosen ids (T, k) int64 and their float32 weights (T, k);
    ``return_logits``: also the router's float32 logits (T, E) (after those, when both are asked).
    The same as ``prepare_moe_decode(...)(x_TD, ...)``."""
    if x_TD.dim() != 2:
        raise ValueError(f"moekit.ops.native.moe_decode: x must be a (T, D) matrix with unit column stride, got "
                         f"shape {tuple(x_TD.shape)} strides {x_TD.stride()}")
    call = prepare_moe_decode(x_TD.shape[1], w_router_ED, b_router_E, k, score, normalize, scale, selection_bias_E,
                              w_in_EHD, b_in_EH, w2_EDF, b2_ED, glu, activation, groups, interleaved=interleaved,
                              clamp=clamp, dtype=x_TD.dtype)
    return call(x_TD, threads, return_routing=return_routing, return_logits=return_logits)


class DecodeCall:
    """:func:`moe_decode` with its weights' arguments checked and laid out once (:func:`prepare_moe_decode`): a call
    checks only the input rows. Holds the weights' addresses, not the tensors: valid while they stay where they are
    (a caller that keeps one across calls compares the weights' ``data_ptr``, dtype, shape and strides first, as
    ``moekit.fused_decode`` does). ``copied``: the selection bias was converted (its values are this call's copy)."""

    __slots__ = ("_fn", "_args", "_args_ref", "_keep", "D", "E", "k", "Dout", "dtype", "_expert_bytes", "copied")

    def __init__(self, fn, args: _DecodeArgs, keep: Tensor | None, D: int, E: int, k: int, Dout: int,
                 dtype: torch.dtype, expert_bytes: int) -> None:
        self._fn, self._args, self._args_ref, self._keep = fn, args, ctypes.byref(args), keep
        self.D, self.E, self.k, self.Dout, self.dtype, self._expert_bytes = D, E, k, Dout, dtype, expert_bytes
        self.copied = keep is not None

    def checked(self, x_TD: Tensor, return_logits: bool = False) -> tuple[Tensor, Tensor | None]:
        """``(y, the float32 logits or None)`` for a caller that has checked ``x_TD`` itself: a (T, D) matrix of the
        call's dtype with unit column stride, ``T <= MAX_ROWS`` (``moekit.fused_decode``). No checks, the default
        threads: after a layer's weights have swept the caches each tensor method costs microseconds."""
        return self.launch_checked(x_TD, x_TD.shape[0], x_TD.stride(0), x_TD.shape, return_logits)

    def launch_checked(self, x: Tensor, T: int, stride0: int, shape: tuple[int, ...], return_logits: bool = False,
                       threads: int | None = None, idx: Tensor | None = None,
                       wts: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``(y, the float32 logits (T, E) or None)`` for a checked ``x`` of ``T`` rows ``stride0`` apart, of the
        given ``shape`` ((T, D), or (B, S, D) for contiguous rows; ``y`` has the same leading dimensions)
        (``moekit.fused_decode.DecodeFusion.quick``: the caller gives what it has read of ``x``). ``threads``: None
        for the default; ``idx`` / ``wts``: optional (T, k) outputs of the routing."""
        y = _empty(*shape[:-1], self.Dout, dtype=self.dtype)
        logits = _empty(T, self.E, dtype=torch.float32) if return_logits else None
        if threads is None:
            nbytes = (self.E if self.E < T * self.k else T * self.k) * self._expert_bytes
            threads = _get_num_threads() if nbytes >= _PARALLEL_MIN_BYTES else 1
        status = self._fn(self._args_ref, x.data_ptr(), stride0, y.data_ptr(), self.Dout, T, threads,
                          None if idx is None else idx.data_ptr(), None if wts is None else wts.data_ptr(),
                          None if logits is None else logits.data_ptr())
        if status:
            self._raise(status)
        return y, logits

    @staticmethod
    def _raise(status: int) -> None:
        if status == 1:
            raise MemoryError("moekit.ops.native.moe_decode: the native kernel could not allocate its work buffers")
        raise ValueError(f"moekit.ops.native.moe_decode: the kernel rejected its arguments (status {status})")

    def __call__(self, x_TD: Tensor, threads: int | None = None, *, return_routing: bool = False,
                 return_logits: bool = False) -> Tensor | tuple[Tensor, ...]:
        if x_TD.dim() != 2 or x_TD.stride(1) != 1 or x_TD.shape[1] != self.D:
            raise ValueError(f"moekit.ops.native.moe_decode: x must be a (T, {self.D}) matrix with unit column "
                             f"stride, got shape {tuple(x_TD.shape)} strides {x_TD.stride()}")
        if x_TD.dtype != self.dtype:
            raise TypeError(f"moekit.ops.native.moe_decode: every tensor must share the input's dtype {x_TD.dtype}, "
                            f"got weights of {self.dtype}")
        T = x_TD.shape[0]
        if T > MAX_ROWS:
            raise ValueError(f"moekit.ops.native.moe_decode: at most {MAX_ROWS} tokens per call, got {T}")
        idx = torch.empty(T, self.k, dtype=torch.int64) if return_routing else None
        wts = torch.empty(T, self.k, dtype=torch.float32) if return_routing else None
        y, logits = self.launch_checked(x_TD, T, x_TD.stride(0), x_TD.shape, return_logits, threads, idx, wts)
        if not (return_routing or return_logits):
            return y
        return (y, *((idx, wts) if return_routing else ()), *((logits,) if return_logits else ()))


def prepare_moe_decode(D: int, w_router_ED: Tensor, b_router_E: Tensor | None, k: int, score: str,
                       normalize: bool, scale: float, selection_bias_E: Tensor | None, w_in_EHD: Tensor,
                       b_in_EH: Tensor | None, w2_EDF: Tensor, b2_ED: Tensor | None, glu: bool, activation: str,
                       groups: tuple[int, int, str] | None = None, *, interleaved: bool = False,
                       clamp: tuple[float, float] | None = None, dtype: torch.dtype | None = None) -> DecodeCall:
    """The weights' half of :func:`moe_decode` (same arguments, ``D`` the hidden size, ``dtype`` the inputs' dtype,
    by default the router weight's), checked once: a :class:`DecodeCall` taking ``x_TD``."""
    lib = _require()
    dtype = w_router_ED.dtype if dtype is None else dtype
    E = w_router_ED.shape[0]
    if w_router_ED.dim() != 2 or tuple(w_router_ED.shape) != (E, D) or w_router_ED.stride(1) != 1:
        raise ValueError(f"moekit.ops.native.moe_decode: the router weight must be (E, {D}) with unit inner stride, "
                         f"got {tuple(w_router_ED.shape)}")
    if not 1 <= k <= E:
        raise ValueError(f"moekit.ops.native.moe_decode: k must lie in [1, {E}], got {k}")
    if score not in SCORES:
        raise ValueError(f"moekit.ops.native.moe_decode: score {score!r} unknown; valid: {', '.join(SCORES)}")
    gating = _gating(glu, activation, interleaved, clamp, "moe_decode")
    Ew, H, Dw = w_in_EHD.shape
    F = H // 2 if glu else H
    if Ew != E or Dw != D or w2_EDF.shape[0] != E or w2_EDF.shape[2] != F or (glu and H % 2):
        raise ValueError(f"moekit.ops.native.moe_decode: shapes do not chain: x (T, {D}), router "
                         f"{tuple(w_router_ED.shape)}, w_in {tuple(w_in_EHD.shape)}, w2 {tuple(w2_EDF.shape)}, "
                         f"glu={glu}")
    ld_in, cols_in = _layout(w_in_EHD, "moe_decode")
    ld2, cols2 = _layout(w2_EDF, "moe_decode")
    suffix = _same_dtype("moe_decode", dtype, w_router_ED, b_router_E, w_in_EHD, b_in_EH, w2_EDF, b2_ED)
    bias = keep = None
    if selection_bias_E is not None:
        bias = selection_bias_E.detach().to(torch.float32).contiguous()
        if bias.shape != (E,):
            raise ValueError(f"moekit.ops.native.moe_decode: the selection bias must have shape ({E},), got "
                             f"{tuple(bias.shape)}")
        if bias.data_ptr() != selection_bias_E.data_ptr():
            keep = bias  # a converted copy: the call holds it
    n_group, topk_group, group_max = 0, 0, 0
    if groups is not None:
        n_group, topk_group, how = groups
        if n_group < 1 or E % n_group or not 1 <= topk_group <= n_group or how not in ("top2sum", "max"):
            raise ValueError(f"moekit.ops.native.moe_decode: groups must be (n_group dividing {E}, topk_group in "
                             f"[1, n_group], 'top2sum' or 'max'), got {groups}")
        group_max = int(how == "max")
    Dout = w2_EDF.shape[1]
    args = _DecodeArgs(D, w_router_ED.data_ptr(), w_router_ED.stride(0),
                       None if b_router_E is None else b_router_E.data_ptr(), E, k, SCORES[score],
                       int(bool(normalize)), float(scale), None if bias is None else bias.data_ptr(),
                       n_group, topk_group, group_max, w_in_EHD.data_ptr(), w_in_EHD.stride(0), ld_in, cols_in, H,
                       None if b_in_EH is None else b_in_EH.data_ptr(), 0 if b_in_EH is None else b_in_EH.stride(0),
                       w2_EDF.data_ptr(), w2_EDF.stride(0), ld2, cols2, Dout,
                       None if b2_ED is None else b2_ED.data_ptr(), 0 if b2_ED is None else b2_ED.stride(0), *gating)
    return DecodeCall(getattr(lib, f"moekit_moe_decode_args_{suffix}"), args, keep, D, E, k, Dout, dtype,
                      (H * D + Dout * F) * w_in_EHD.element_size())


def takes_grid(*rows: Tensor) -> bool:
    """Whether :func:`gather_sum` and :func:`combine_backward` take these row matrices: float32 or bfloat16 CPU
    matrices of one dtype with unit stride along each row, outside ``torch.compile`` tracing, and the kernels
    available (built on the first call). Autograd is the caller's: these kernels only compute values."""
    return (all(r.dtype == rows[0].dtype and r.device.type == "cpu" and r.dim() == 2 and r.stride(1) == 1
                for r in rows)
            and rows[0].dtype in DTYPES and not torch.compiler.is_compiling() and available())


def _grid_args(where: str, idx_N: Tensor, w_N: Tensor | None, num_slots: int, num_tokens: int) -> tuple[Tensor, ...]:
    N = num_slots * num_tokens
    if idx_N.shape != (N,) or (w_N is not None and w_N.shape != (N,)):
        raise ValueError(f"moekit.ops.native.{where}: the index and weights must have num_slots * num_tokens = {N} "
                         f"entries, got {tuple(idx_N.shape)} and {None if w_N is None else tuple(w_N.shape)}")
    idx_N = idx_N.to(torch.int64).contiguous()
    if w_N is not None:
        w_N = w_N.detach().to(torch.float32).contiguous()
    return idx_N, w_N


def gather_sum(y_ND: Tensor, inv_N: Tensor, w_N: Tensor | None, num_slots: int, num_tokens: int,
               threads: int | None = None) -> Tensor:
    """``out[t] = sum_k w[k*T + t] * y[inv[k*T + t]]`` (``w`` None: unweighted), one pass over the rows of ``y``
    with float32 accumulation (a bfloat16 result rounded once): the combine of a top-k grid whose pairs the experts
    saw sorted (pair ``j = k*T + t`` at sorted row ``inv[j]``), and unweighted, the backward of the dispatch's gather
    of K copies. ``w`` is read as float32. Check :func:`takes_grid` first."""
    lib = _require()
    K, T = num_slots, num_tokens
    if y_ND.shape[0] != K * T:
        raise ValueError(f"moekit.ops.native.gather_sum: y has {y_ND.shape[0]} rows, not num_slots * num_tokens = "
                         f"{K * T}")
    inv_N, w_N = _grid_args("gather_sum", inv_N, w_N, K, T)
    suffix = _same_dtype("gather_sum", y_ND)
    D = y_ND.shape[1]
    out = torch.empty(T, D, dtype=y_ND.dtype)
    status = getattr(lib, f"moekit_gather_sum_{suffix}")(
        y_ND.data_ptr(), y_ND.stride(0), inv_N.data_ptr(), None if w_N is None else w_N.data_ptr(), K, T, D,
        out.data_ptr(), out.stride(0), _threads(y_ND.numel() * y_ND.element_size(), threads))
    if status:
        raise ValueError(f"moekit.ops.native.gather_sum: row indices must lie in [0, {K * T})")
    return out


def combine_backward(g_TD: Tensor, y_ND: Tensor, order_N: Tensor, w_N: Tensor | None, num_slots: int,
                     num_tokens: int, threads: int | None = None) -> tuple[Tensor, Tensor | None]:
    """The backward of :func:`gather_sum`'s weighted combine, one pass over the sorted rows: ``gy[n] = w[j] * g[t]``
    and ``gw[j] = <g[t], y[n]>`` for sorted row ``n`` holding pair ``j = order[n] = k*T + t``. ``w`` None (an
    unweighted combine): ``gy[n] = g[t]`` and ``gw`` is None. ``gy`` has ``y``'s dtype; ``gw`` is float32 in grid
    order. Check :func:`takes_grid` first."""
    lib = _require()
    K, T = num_slots, num_tokens
    D = y_ND.shape[1]
    if y_ND.shape[0] != K * T or g_TD.shape != (T, D):
        raise ValueError(f"moekit.ops.native.combine_backward: expected y of {K * T} rows and g of shape ({T}, {D}), "
                         f"got {tuple(y_ND.shape)} and {tuple(g_TD.shape)}")
    order_N, w_N = _grid_args("combine_backward", order_N, w_N, K, T)
    suffix = _same_dtype("combine_backward", y_ND, g_TD)
    gy = torch.empty_like(y_ND, memory_format=torch.contiguous_format)
    gw = None if w_N is None else torch.empty(K * T, dtype=torch.float32)
    status = getattr(lib, f"moekit_combine_backward_{suffix}")(
        g_TD.data_ptr(), g_TD.stride(0), y_ND.data_ptr(), y_ND.stride(0), order_N.data_ptr(),
        None if w_N is None else w_N.data_ptr(), K, T, D, gy.data_ptr(), gy.stride(0),
        None if gw is None else gw.data_ptr(), _threads(y_ND.numel() * y_ND.element_size(), threads))
    if status:
        raise ValueError(f"moekit.ops.native.combine_backward: row indices must lie in [0, {K * T})")
    return gy, gw


@functools.cache
def torch_sgemm() -> int | None:
    """The address of the BLAS ``sgemm_`` that torch's CPU library exports (MKL in the x86 wheels), or None where
    torch has no MKL or does not export it. :func:`grouped_gemm` calls it; MKL runs single-threaded inside an
    OpenMP parallel region, which is what lets the products of one call run side by side."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        libtorch = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        return ctypes.cast(libtorch.sgemm_, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


def takes_gemm(*mats: Tensor) -> bool:
    """Whether :func:`grouped_gemm` takes these operands: float32 CPU tensors with unit stride along their last dim
    (a 3-D weight also along its middle dim: (in, out) storage seen transposed), sizes and strides below 2**31 (BLAS's
    int), at least two torch threads (with one, torch's grouped_mm is as fast), outside ``torch.compile`` tracing, the
    kernels built and torch's ``sgemm_`` found."""
    return (all(m.dtype == torch.float32 and m.device.type == "cpu" and _gemm_layout(m) is not None
                and max(*m.shape, *m.stride()) < 2**31 for m in mats)
            and torch.get_num_threads() > 1 and not torch.compiler.is_compiling() and available()
            and torch_sgemm() is not None)


def _gemm_layout(m: Tensor) -> int | None:
    """How :func:`grouped_gemm` reads a matrix: 0 with unit stride along the last dim, 1 for a 3-D weight with unit
    stride along the middle dim (an (E, in, out) storage seen as (E, out, in)), None otherwise."""
    if m.stride(-1) == 1 or m.shape[-1] == 1:
        return 0
    return 1 if m.dim() == 3 and m.stride(-2) == 1 else None


def weights_transposed(w_EOI: Tensor) -> bool:
    """Whether :func:`grouped_gemm` reads these (E, out, in) weights as an (E, in, out) storage seen transposed."""
    return _gemm_layout(w_EOI) == 1


GEMM_MODES = {"forward": 0, "input_grad": 1, "weight_grad": 2}


def grouped_gemm(mode: str, a: Tensor, b: Tensor, offsets: list[int], threads: int | None = None) -> Tensor:
    """One BLAS product per expert, the experts' products side by side on torch's threads (``native_gemm.h``).
    ``offsets``: E + 1 row offsets (``offsets[e]:offsets[e + 1]`` are expert e's rows).

    - ``"forward"``: ``a`` rows (N, I), ``b`` weights (E, O, I) -> (N, O), ``y[rows] = a[rows] @ b[e].T``;
    - ``"input_grad"``: ``a`` gradient rows (N, O), ``b`` weights (E, O, I) -> (N, I), ``a[rows] @ b[e]``
      (the weights of both may be an (E, I, O) storage seen transposed);
    - ``"weight_grad"``: ``a`` gradient rows (N, O), ``b`` the forward's input rows (N, I) -> (E, O, I),
      ``a[rows].T @ b[rows]`` (zero for an expert without rows).

    Check :func:`takes_gemm` first."""
    lib = _require()
    if torch_sgemm() is None:
        raise RuntimeError("moekit native grouped GEMM unavailable: torch exports no MKL sgemm_")
    if mode not in GEMM_MODES:
        raise ValueError(f"moekit.ops.native.grouped_gemm: unknown mode {mode!r}; valid: {', '.join(GEMM_MODES)}")
    E = len(offsets) - 1
    N = a.shape[0]
    if E < 1 or offsets[0] != 0 or offsets[-1] != N or any(o1 < o0 for o0, o1 in zip(offsets, offsets[1:])):
        raise ValueError(f"moekit.ops.native.grouped_gemm: offsets must run from 0 to {N} rows in order, got "
                         f"{offsets[:8]}{'...' if len(offsets) > 8 else ''}")
    if mode == "weight_grad":
        if b.shape[0] != N:
            raise ValueError(f"moekit.ops.native.grouped_gemm: weight_grad needs as many rows in both operands, got "
                             f"{tuple(a.shape)} and {tuple(b.shape)}")
        O, I = a.shape[1], b.shape[1]
        y = torch.empty(E, O, I)
        sWe, ldw, wt = 0, b.stride(0), 0
    else:
        if b.dim() != 3 or b.shape[0] != E or b.shape[2 if mode == "forward" else 1] != a.shape[1]:
            raise ValueError(f"moekit.ops.native.grouped_gemm: {mode} of rows {tuple(a.shape)} with weights "
                             f"{tuple(b.shape)} for {E} experts does not chain")
        O, I = b.shape[1], b.shape[2]
        y = torch.empty(N, O if mode == "forward" else I)
        wt = _gemm_layout(b)
        if wt is None:
            raise ValueError(f"moekit.ops.native.grouped_gemm: weights of strides {b.stride()} have no unit stride "
                             f"along in or out")
        sWe, ldw = b.stride(0), b.stride(2 if wt else 1)
        if ldw < (O if wt else I) or ldw < 1:  # a size-1 dim's stride is free: BLAS wants ld >= the dim
            b, sWe, ldw, wt = b.contiguous(), I * O, I, 0
    threads = threads or torch.get_num_threads()
    chunk = max(256, -(-N // (2 * threads)))  # a group larger than this is split (balance across the threads)
    offs = array.array("q", offsets)
    status = lib.moekit_grouped_gemm(torch_sgemm(), GEMM_MODES[mode], E, offs.buffer_info()[0], a.data_ptr(),
                                     a.stride(0), b.data_ptr(), sWe, ldw, wt, y.data_ptr(), y.stride(0) if y.dim() == 2
                                     else 0, O, I, chunk, threads)
    if status:
        raise MemoryError("moekit.ops.native.grouped_gemm: could not allocate the work list")
    return y


def _glu_form(where: str, clamp: tuple[float, float] | None) -> tuple[int, float, float]:
    if clamp is None:
        return 0, 1.0, 0.0
    alpha, limit = (float(v) for v in clamp)
    if not limit > 0:
        raise ValueError(f"moekit.ops.native.{where}: the clamp limit must be > 0, got {limit}")
    return 1, alpha, limit


def swiglu(h_N2F: Tensor, threads: int | None = None, interleaved: bool = False,
           clamp: tuple[float, float] | None = None) -> Tensor:
    """``silu(gate) * up`` in one pass over ``h`` (float32 arithmetic; a bfloat16 result rounded once), the gate
    ``h[:, :F]`` and up ``h[:, F:]``, or ``h[:, 0::2]`` and ``h[:, 1::2]`` with ``interleaved``. ``clamp=(alpha,
    limit)``: gpt-oss's clamped form ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)``, ``g = min(gate,
    limit)``. Check :func:`takes_grid` on ``h`` first."""
    lib = _require()
    N, H = h_N2F.shape
    if H % 2:
        raise ValueError(f"moekit.ops.native.swiglu: the fused gate/up rows need an even width, got {H}")
    suffix = _same_dtype("swiglu", h_N2F)
    clamped, alpha, limit = _glu_form("swiglu", clamp)
    out = torch.empty(N, H // 2, dtype=h_N2F.dtype)
    getattr(lib, f"moekit_swiglu_{suffix}")(h_N2F.data_ptr(), h_N2F.stride(0), N, H // 2, out.data_ptr(),
                                             out.stride(0), int(interleaved), clamped, alpha, limit,
                                             _threads(h_N2F.numel() * h_N2F.element_size(), threads))
    return out


def swiglu_backward(grad_NF: Tensor, h_N2F: Tensor, threads: int | None = None, interleaved: bool = False,
                    clamp: tuple[float, float] | None = None) -> Tensor:
    """The gradient of :func:`swiglu` (same ``interleaved`` and ``clamp``) with respect to ``h``, in one (N, 2F)
    buffer in ``h``'s layout, recomputing the sigmoid from ``h``. Check :func:`takes_grid` on both first."""
    lib = _require()
    N, H = h_N2F.shape
    if grad_NF.shape != (N, H // 2) or H % 2:
        raise ValueError(f"moekit.ops.native.swiglu_backward: grad {tuple(grad_NF.shape)} does not match rows "
                         f"{tuple(h_N2F.shape)}")
    suffix = _same_dtype("swiglu_backward", h_N2F, grad_NF)
    clamped, alpha, limit = _glu_form("swiglu_backward", clamp)
    gh = torch.empty(N, H, dtype=h_N2F.dtype)
    getattr(lib, f"moekit_swiglu_backward_{suffix}")(
        grad_NF.data_ptr(), grad_NF.stride(0), h_N2F.data_ptr(), h_N2F.stride(0), N, H // 2, gh.data_ptr(),
        gh.stride(0), int(interleaved), clamped, alpha, limit, _threads(h_N2F.numel() * h_N2F.element_size(), threads))
    return gh
