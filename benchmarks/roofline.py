"""The special-function (SFU / MUFU) roofline of the divergence kernels.

Every pair x class element of the divergence needs one logarithm, and on NVIDIA GPUs since
Volta a logarithm (MUFU.LG2) issues at 16 per clock per SM (4 per SM sub-partition). So
the ceiling for kernels that take every log on the SFU is

    SMs x 16 x SM clock   logarithms (elements) per second,

which a kernel can only beat by evaluating part of its logs as FMA polynomials. This module
gives that theoretical limit from the device's properties and measures the achievable one
with a microbenchmark: a Triton kernel whose threads each run many independent
``lg2.approx.ftz.f32`` chains. GPU only; on CPU every figure is None ("n/a" in the tables).
"""
from __future__ import annotations

import subprocess
from dataclasses import asdict, dataclass

import torch

LG2_PER_CLOCK_PER_SM = 16
# Documented fallback when neither NVML nor nvidia-smi can say: the H100 SXM5 boost clock.
DEFAULT_SM_CLOCK_HZ = 1.98e9

try:  # Triton is optional for this module: it is only needed for the measurement
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton ships with torch on Linux
    triton = None


@dataclass
class SfuLimit:
    device_name: str
    sm_count: int
    clock_hz: float
    clock_source: str
    theoretical_per_s: float  # sm_count * 16 * clock_hz
    measured_per_s: float | None = None  # the lg2 microbenchmark, None when not run
    measured_note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        line = (f"SFU limit: {self.sm_count} SMs x {LG2_PER_CLOCK_PER_SM} lg2/clock x {self.clock_hz / 1e9:.3f} GHz "
                f"({self.clock_source}) = {self.theoretical_per_s / 1e12:.2f} T lg2/s")
        if self.measured_per_s:
            line += (f"; lg2 microbenchmark: {self.measured_per_s / 1e12:.2f} T/s "
                     f"({100 * self.measured_per_s / self.theoretical_per_s:.0f}% of theoretical)")
        elif self.measured_note:
            line += f"; microbenchmark: {self.measured_note}"
        return line


def theoretical_limit(sm_count: int, clock_hz: float) -> float:
    return float(sm_count) * LG2_PER_CLOCK_PER_SM * float(clock_hz)


def _clock_from_nvml(props) -> float | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{props.uuid}")
            return pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM) * 1e6
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # NVML missing from the driver, unknown UUID format, ...
        return None


def _clock_from_nvidia_smi(props) -> float | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--id=GPU-{props.uuid}", "--query-gpu=clocks.max.sm",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
        return float(out.stdout.strip().splitlines()[0]) * 1e6 if out.returncode == 0 else None
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def sm_clock(device: torch.device) -> tuple[float, str]:
    """(max SM clock in Hz, where it came from): NVML, nvidia-smi, the CUDA properties, a default."""
    props = torch.cuda.get_device_properties(device)
    hz = _clock_from_nvml(props)
    if hz:
        return hz, "NVML max SM clock"
    hz = _clock_from_nvidia_smi(props)
    if hz:
        return hz, "nvidia-smi clocks.max.sm"
    khz = getattr(props, "clock_rate", 0) or 0  # absent or 0 with newer CUDA runtimes
    if khz > 0:
        return khz * 1e3, "cudaDeviceProp.clockRate"
    return DEFAULT_SM_CLOCK_HZ, "default: H100 SXM boost clock 1.98 GHz"


if triton is not None:
    @triton.jit
    def _lg2(x):
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)

    @triton.jit
    def _lg2_throughput_kernel(out_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        # Four independent chains per element keep the SFU pipeline full; x -> lg2(x) + 2
        # converges to 4 from 2, so no chain degenerates to NaN or denormals.
        a = offs.to(tl.float32) * 1e-6 + 2.0
        b = a + 0.25
        c = a + 0.5
        d = a + 0.75
        for _ in range(ITERS):
            a = _lg2(a) + 2.0
            b = _lg2(b) + 2.0
            c = _lg2(c) + 2.0
            d = _lg2(d) + 2.0
        tl.store(out_ptr + offs, a + b + c + d)  # keeps the chains live


def measure_lg2_throughput(device: torch.device, iters: int = 2048, block: int = 1024,
                           programs_per_sm: int = 16) -> float:
    """Logarithms per second the GPU sustains (median of triton.testing.do_bench)."""
    if triton is None:
        raise RuntimeError("Triton is not installed")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    grid = (sms * programs_per_sm,)
    out = torch.empty(grid[0] * block, device=device, dtype=torch.float32)
    with torch.cuda.device(device):
        run = lambda: _lg2_throughput_kernel[grid](out, ITERS=iters, BLOCK=block, num_warps=4)  # noqa: E731
        run()
        ms = triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median")
    if not bool(torch.isfinite(out).all()):
        raise RuntimeError("the lg2 microbenchmark produced non-finite values")
    return grid[0] * block * 4 * iters / (ms * 1e-3)


def sfu_limit(device: torch.device, measure: bool = True) -> SfuLimit | None:
    """The SFU limit of a CUDA device (measured too unless measure=False); None on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    hz, source = sm_clock(device)
    limit = SfuLimit(props.name, props.multi_processor_count, hz, source,
                     theoretical_limit(props.multi_processor_count, hz))
    if not measure:
        limit.measured_note = "not measured (--no-roofline)"
        return limit
    try:
        limit.measured_per_s = measure_lg2_throughput(device)
    except Exception as e:  # report, do not abort the whole run for the roofline
        limit.measured_note = f"failed: {type(e).__name__}: {e}"
    return limit


def fractions(elements: int | None, median_ms: float | None, limit: SfuLimit | None):
    """(elements per second, fraction of the theoretical limit, fraction of the measured one)."""
    if not elements or not median_ms:
        return None, None, None
    rate = elements / (median_ms * 1e-3)
    if limit is None:
        return rate, None, None
    measured = rate / limit.measured_per_s if limit.measured_per_s else None
    return rate, rate / limit.theoretical_per_s, measured
