"""Bindings of the bf16 kernels for x86 CPUs with AVX512-BF16 (cpu_kernels.c): the decode step's linear for a
few input rows and one-token attention over a run of the KV cache, a prompt's attention, RMSNorm, RoPE, SiLU·up
and quick_gelu. The library is built on first use with the system's C compiler and cached; where it cannot be
(another CPU, no compiler, PyTorch without libgomp) `unavailable_reason()` says why and the platform keeps the
PyTorch ops. Whether to use it at all is the engine config's `cpu_kernels`."""
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp", "-shared", "-fPIC"]
ATTENTION_CHUNK, ATTENTION_MAX_CHUNKS = 64, 32  # one-token attention: tokens per chunk, at most that many chunks
CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm_utils" / "kernels"


def _cpuinfo(field: str) -> str:
    """The value of `field` for the first CPU in /proc/cpuinfo, or "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_model() -> str:
    return _cpuinfo("model name")


def _cpu_flags() -> set[str]:
    return set(_cpuinfo("flags").split())


@functools.cache
def max_rows() -> int:
    """The most input rows a linear takes through our kernel; larger inputs go to oneDNN. Up to 16 rows (a batch's
    decode step) our kernel is faster than oneDNN on AVX512-BF16 CPUs; on CPUs with AMX, oneDNN's tiles take over
    after 4."""
    return 4 if "amx_bf16" in _cpu_flags() else 16


def prefetch_distance() -> int:
    """Bytes the kernels prefetch ahead of their reads: 1 KiB on Intel, none on AMD, whose hardware prefetchers
    stream faster alone (figures in BENCHMARKS.md)."""
    return 0 if _cpuinfo("vendor_id") == "AuthenticAMD" else 1024


def _torch_uses_libgomp() -> bool:
    """Our -fopenmp library must share PyTorch's OpenMP runtime, or two thread pools would fight for the cores."""
    try:
        with open("/proc/self/maps") as f:
            return "libgomp" in f.read()
    except OSError:
        return False


def compiler() -> str | None:
    """The C compiler to build with: $CC, else the one Python was built with, else `cc`."""
    configured = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(configured) or shutil.which("cc")


def build_library(source_path: Path, compiler: str, flags: list[str] = FLAGS) -> Path:
    """`source_path` compiled into a shared library in the cache folder (once per source, compiler and flags)."""
    source = source_path.read_bytes()
    tag = hashlib.sha256(source + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{source_path.stem}-{tag}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)  # concurrent builders (TP ranks) each rename
        os.close(fd)
        try:
            subprocess.run([compiler, *flags, str(source_path), "-o", tmp, "-lm"], check=True, capture_output=True, text=True)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


@functools.cache
def _load() -> tuple[object | None, str]:
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return None, f"needs Linux on x86_64, not {sys.platform}/{platform.machine()}"
    missing = CPU_FLAGS - _cpu_flags()
    if missing:
        return None, f"the CPU lacks {', '.join(sorted(missing))}"
    if not _torch_uses_libgomp():
        return None, "this PyTorch build does not use libgomp"
    cc = compiler()
    if cc is None:
        return None, "no C compiler found (set CC)"
    try:
        lib = ctypes.CDLL(str(build_library(SOURCE, cc)))
    except (subprocess.CalledProcessError, OSError) as e:
        lines = (getattr(e, "stderr", "") or str(e)).splitlines()
        first_error = next((line for line in lines if "error" in line), lines[0] if lines else "")
        return None, f"building {SOURCE.name} failed: {first_error.strip()}"
    ptr, long, i32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.vllm_utils_gemv_bf16.argtypes = [ptr, ptr, long, ptr, ptr, long, i32, i32, i32, ptr, i32, i32]
    lib.vllm_utils_gemv_bf16.restype = None
    lib.vllm_utils_decode_attention_bf16.argtypes = [ptr, ptr, ptr, ptr, i32, i32, i32, i32, long, ctypes.c_float, i32,
                                                     i32, ptr]
    lib.vllm_utils_decode_attention_bf16.restype = None
    lib.vllm_utils_rmsnorm_bf16.argtypes = [ptr, ptr, ptr, ptr, i32, i32, ctypes.c_float]
    lib.vllm_utils_rmsnorm_bf16.restype = None
    lib.vllm_utils_rope_bf16.argtypes = [ptr, ptr, ptr, ptr, i32, i32, i32, long]
    lib.vllm_utils_rope_bf16.restype = None
    lib.vllm_utils_prefill_attention_bf16.argtypes = [ptr, ptr, ptr, ptr, i32, i32, i32, i32, long, long,
                                                      ctypes.c_float, i32, i32, ptr, ptr]
    lib.vllm_utils_prefill_attention_bf16.restype = None
    lib.vllm_utils_silu_mul_bf16.argtypes = [ptr, ptr, i32, i32, long]
    lib.vllm_utils_silu_mul_bf16.restype = None
    lib.vllm_utils_quick_gelu_bf16.argtypes = [ptr, ptr, long]
    lib.vllm_utils_quick_gelu_bf16.restype = None
    lib.vllm_utils_delta_rule_step.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i32, i32, i32, i32, i32]
    lib.vllm_utils_delta_rule_step.restype = None
    lib.vllm_utils_set_prefetch.argtypes = [i32]
    lib.vllm_utils_set_prefetch(prefetch_distance())
    return lib, ""


def unavailable_reason() -> str:
    """Empty when the kernels are ready to use, else why not."""
    return _load()[1]


def supports(weight: torch.Tensor) -> bool:
    """Whether the kernel can serve this linear weight ([N, K], bf16, contiguous, on the CPU)."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and weight.is_contiguous() and weight.shape[0] % 4 == 0 and weight.shape[1] % 32 == 0
            and _load()[0] is not None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           next_weight: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), weight as in `supports` (for x of at most `max_rows()` rows, after flattening, it
    beats oneDNN).
    `next_weight`: the weight the next decode linear will read; the kernel reads the start of it into cache."""
    fn = _load()[0].vllm_utils_gemv_bf16
    n, k = weight.shape
    rows = x.reshape(-1, k)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    assert rows.dtype == torch.bfloat16
    if bias is not None:
        bias = bias.to(torch.bfloat16).contiguous()  # held in a name: the kernel reads it after this line
    out = torch.empty(rows.shape[0], n, dtype=torch.bfloat16)
    fn(weight.data_ptr(), rows.data_ptr(), rows.stride(0), None if bias is None else bias.data_ptr(),
       out.data_ptr(), n, rows.shape[0], n, k, None if next_weight is None else next_weight.data_ptr(),
       *(next_weight.shape if next_weight is not None else (0, 0)))
    return out.view(*x.shape[:-1], n)


def supports_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `decode_attention` can take these: bf16 CPU tensors, q [heads, dim], k and v [tokens, kv_heads, dim]
    with dense rows (a slice of the cache), dim a multiple of 32."""
    dim = q.shape[-1]
    return (q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.device.type == "cpu" and dim % 32 == 0
            and q.shape[0] % k.shape[1] == 0 and k.stride() == v.stride()
            and k.stride()[1:] == (dim, 1) and _load()[0] is not None)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale * q k^T) v for one query token per head: q [heads, dim], k and v as in `supports_attention`.
    Returns [heads, dim]."""
    heads, dim = q.shape
    length = k.shape[0]
    q = q.contiguous()
    out = torch.empty_like(q)
    threads = torch.get_num_threads()  # PyTorch's OpenMP pool, which the kernel shares
    # chunks of tokens the threads claim: enough for a late thread's share to be taken over, few enough to merge fast
    chunk = max(ATTENTION_CHUNK, -(-length // ATTENTION_MAX_CHUNKS))
    scratch = torch.empty(heads * (length + -(-length // chunk) * (dim + 2)), dtype=torch.float32)
    _load()[0].vllm_utils_decode_attention_bf16(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), heads,
                                                k.shape[1], dim, length, k.stride(0), scale, threads, chunk,
                                                scratch.data_ptr())
    return out


def _dense_bf16_cpu(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def supports_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `prefill_attention` can take these: bf16 CPU tensors q [tokens, heads, dim], k and v [tokens,
    kv_heads, dim], each token's heads dense (rows may be strided, e.g. views of a fused QKV, k's an even
    number of values apart), dim % 64 == 0."""
    dim = q.shape[-1]
    return (q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.device.type == "cpu" and dim % 64 == 0
            and q.dim() == k.dim() == 3 and q.shape[0] == k.shape[0] and q.shape[1] % k.shape[1] == 0
            and q.stride()[1:] == (dim, 1) and k.stride() == v.stride() and k.stride()[1:] == (dim, 1)
            and k.stride(0) % 2 == 0 and _load()[0] is not None)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
                      window: int | None = None, key_ends: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(scale * q k^T [+ causal mask]) v for a whole prompt, tensors as in `supports_prefill_attention`;
    with `window` (causal only) each query sees the keys of the last `window` positions; with `key_ends` (causal
    only; [tokens] int32, each > its index) query i sees the keys before key_ends[i], some after it. Returns
    [tokens, heads, dim]."""
    ends = None if key_ends is None else key_ends.to(torch.int32).contiguous()
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    padded = -(-tokens // 64) * 64
    packed = torch.empty(2 * kv_heads * padded * dim, dtype=torch.bfloat16)
    out = torch.empty(tokens, heads, dim, dtype=torch.bfloat16)
    _load()[0].vllm_utils_prefill_attention_bf16(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), tokens,
                                                 heads, kv_heads, dim, q.stride(0), k.stride(0), scale, int(causal),
                                                 window or 0, None if ends is None else ends.data_ptr(),
                                                 packed.data_ptr())
    return out


def supports_delta_rule(states: torch.Tensor) -> bool:
    """Whether `delta_rule_step_` can update this pool of states: float32, contiguous, on the CPU, a value dim of
    at most 512."""
    return (states.dtype == torch.float32 and states.device.type == "cpu" and states.is_contiguous()
            and states.shape[-1] <= 512 and _load()[0] is not None)


def delta_rule_step_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                     states: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """`layers/delta_rule.recurrent_delta_rule` on the states of `slots` in the pool `states` (updated in place):
    q, k [seqs, key heads, key dim], v [seqs, value heads, value dim], g and beta [seqs, value heads]. Returns
    [seqs, value heads, value dim] in v's dtype."""
    dtype = v.dtype
    q, k, v, g, beta = (t.float().contiguous() for t in (q, k, v, g, beta))
    slots = slots.to(torch.int64).contiguous()
    out = torch.empty_like(v)
    seqs, key_heads, key_dim = q.shape
    _load()[0].vllm_utils_delta_rule_step(q.data_ptr(), k.data_ptr(), v.data_ptr(), g.data_ptr(), beta.data_ptr(),
                                          states.data_ptr(), slots.data_ptr(), out.data_ptr(), seqs, key_heads,
                                          v.shape[1], key_dim, v.shape[2])
    return out.to(dtype)


def supports_activation(x: torch.Tensor) -> bool:
    """Whether `silu_mul` (x: [rows, 2n], rows dense) and `quick_gelu` (x contiguous) can take x: bf16 on the CPU,
    a last dimension that splits into halves of a multiple of 16."""
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() >= 1 and x.shape[-1] % 32 == 0
            and x.stride(-1) == 1 and _load()[0] is not None)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up for x = [gate | up] on its last dimension, as in `supports_activation` (and 2-D)."""
    rows, n = x.shape[0], x.shape[1] // 2
    out = torch.empty(rows, n, dtype=torch.bfloat16)
    _load()[0].vllm_utils_silu_mul_bf16(x.data_ptr(), out.data_ptr(), rows, n, x.stride(0))
    return out


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x), for x as in `supports_activation`."""
    x = x.contiguous()
    out = torch.empty_like(x)
    _load()[0].vllm_utils_quick_gelu_bf16(x.data_ptr(), out.data_ptr(), x.numel())
    return out


def supports_rmsnorm(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> bool:
    return _dense_bf16_cpu(x, weight, *([] if residual is None else [residual])) and _load()[0] is not None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of the last dim, as layers.norm.RMSNorm computes it (adding x into `residual` first, in place)."""
    out = torch.empty_like(x)
    n = x.shape[-1]
    _load()[0].vllm_utils_rmsnorm_bf16(x.data_ptr(), None if residual is None else residual.data_ptr(),
                                       weight.data_ptr(), out.data_ptr(), x.numel() // n, n, eps)
    return out


def supports_rope(x: torch.Tensor, positions: torch.Tensor, table: torch.Tensor) -> bool:
    """x: [tokens, heads, head_dim] with dense heads (a view into the fused QKV output is fine)."""
    return (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.dim() == 3 and x.stride(2) == 1
            and x.stride(1) == x.shape[2] and positions.dtype == torch.int64 and positions.is_contiguous()
            and table.dtype == torch.float32 and table.is_contiguous() and _load()[0] is not None)


def rope_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate-half RoPE of x in place, rounding where transformers rounds in bf16."""
    tokens, heads, head_dim = x.shape
    _load()[0].vllm_utils_rope_bf16(x.data_ptr(), positions.data_ptr(), cos.data_ptr(), sin.data_ptr(), tokens,
                                    heads, head_dim, x.stride(0))
