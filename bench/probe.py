"""Machine probe: what this MLX device actually sustains.

Measured rather than looked up, so the roofline is this machine's: memory
bandwidth from a large reduction (reads dominate, as in decoding), dense and
quantized matmul throughput at the canvas shape ([256, hidden] x [hidden, hidden]).
"""

import os
import platform
import subprocess
import time
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version

import mlx.core as mx


def _best_seconds(fn, repeats: int) -> float:
    mx.eval(fn())  # warm-up: compile kernels, page memory in
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - start)
    return best


def memory_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second read by a sum over a ``megabytes``-sized float32 array."""
    x = mx.random.uniform(shape=(megabytes * (1 << 20) // 4,))
    mx.eval(x)
    return x.nbytes / _best_seconds(lambda: x.sum(), repeats)


def matmul_throughput(rows: int, dims: int, dtype=mx.float32, bits: int = None, repeats: int = 5) -> float:
    """FLOP/s of ``[rows, dims] @ [dims, dims]``; ``bits`` quantizes the weight (affine, group 64)."""
    x = mx.random.normal((rows, dims)).astype(dtype)
    w = mx.random.normal((dims, dims)).astype(dtype)
    if bits:
        qw, scales, biases = mx.quantize(w, group_size=64, bits=bits)
        mx.eval(x, qw, scales, biases)
        fn = lambda: mx.quantized_matmul(x, qw, scales, biases, transpose=True, group_size=64, bits=bits)
    else:
        mx.eval(x, w)
        fn = lambda: x @ w.T
    return 2 * rows * dims * dims / _best_seconds(fn, repeats)


def _device_name() -> str:
    info = mx.device_info()
    name = info.get("device_name") or info.get("architecture")
    if platform.system() == "Darwin":
        try:
            name = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip() or name
        except OSError:
            pass
    # "Device(cpu, 0)" says little in a title: name the kind of device instead.
    return f"{name} ({'GPU' if mx.default_device().type == mx.gpu else 'CPU'})"


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


@dataclass(frozen=True)
class MachineProbe:
    device: str
    memory_bytes: int
    bandwidth: float  # bytes/s
    dense_flops: float  # FLOP/s at the canvas shape, in the activation dtype
    quantized_flops: dict  # bits -> FLOP/s
    activation_dtype: str
    versions: dict

    def to_dict(self) -> dict:
        return asdict(self)


def probe(hidden: int = 2816, rows: int = 256, dtype=None, quantized_bits=(4, 8)) -> MachineProbe:
    # The CPU backend's half-precision matmuls are far slower than float32; measure what runs.
    if dtype is None:
        dtype = mx.bfloat16 if mx.default_device() == mx.gpu else mx.float32
    return MachineProbe(
        device=_device_name(),
        memory_bytes=mx.device_info().get("memory_size") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        bandwidth=memory_bandwidth(),
        dense_flops=matmul_throughput(rows, hidden, dtype),
        quantized_flops={bits: matmul_throughput(rows, hidden, dtype, bits) for bits in quantized_bits},
        activation_dtype=str(dtype).split(".")[-1],
        versions={p: _package_version(p) for p in ("mlx", "mlx-lm", "mlx-diffgemma")},
    )
