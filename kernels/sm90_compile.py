"""Compile Pallas (Triton backend) kernels for an H100 (sm_90a) on a machine with no GPU.

How: ``jax.export(..., platforms=["cuda"])`` lowers a jitted function; every Pallas call becomes a
``__gpu$xla.gpu.triton`` custom call whose backend config holds the Triton IR bytecode (``ir``), the
kernel ``name`` and its ``num_warps`` / ``num_stages``. With ``jax-cuda12-plugin`` installed (and
``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1``), ``jax._src.lib.triton.compile("CUDA", ir, "9.0", ...)`` runs
Triton's own pipeline to PTX and reports the dynamic shared memory; ``ptxas -v --gpu-name=sm_90a``
(package ``nvidia-cuda-nvcc-cu12``) then reports registers and spills. This is what the GPU would
do at the first call, minus the launch, so a kernel that compiles here compiles on an H100.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

H100_SMEM_PER_BLOCK = 227 * 1024  # bytes of shared memory one block may use on sm_90
MAX_REGISTERS = 255

__all__ = [
    "H100_SMEM_PER_BLOCK",
    "MAX_REGISTERS",
    "Sm90Result",
    "TritonCall",
    "compile_sm90",
    "export_cuda",
    "find_ptxas",
    "triton_calls",
    "unavailable_reason",
]


@dataclasses.dataclass(frozen=True)
class TritonCall:
    name: str
    ir: bytes
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Sm90Result:
    name: str
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    smem: int  # bytes of shared memory per block (Triton's dynamic allocation)
    wgmma_serialized: bool  # ptxas C7511: not enough registers to pipeline the tensor-core MMAs
    ptxas_log: str

    @property
    def ok(self) -> bool:
        return self.smem <= H100_SMEM_PER_BLOCK

    @property
    def clean(self) -> bool:
        """No spills, no register cap hit, MMAs pipelined: what a tuned configuration must be."""
        return (
            self.ok
            and self.spill_stores == 0
            and self.spill_loads == 0
            and self.registers < MAX_REGISTERS
            and not self.wgmma_serialized
        )

    def blocks_per_sm(self) -> int:
        """Resident blocks per H100 SM from registers (64K), shared memory (228 KiB) and 2048 threads."""
        threads = 32 * self.num_warps
        by_regs = 65536 // max(1, ((max(self.registers, 1) * threads + 255) // 256) * 256)
        by_smem = (228 * 1024) // self.smem if self.smem else 32
        return max(0, min(by_regs, by_smem, 2048 // threads, 32))

    def row(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("ptxas_log")
        d["grid"] = list(self.grid)
        d["blocks_per_sm"] = self.blocks_per_sm()
        return d


def find_ptxas() -> str | None:
    try:
        import nvidia.cuda_nvcc as nvcc  # the nvidia-cuda-nvcc-cu12 wheel

        for base in nvcc.__path__:
            p = Path(base) / "bin" / "ptxas"
            if p.is_file():
                return str(p)
    except ImportError:
        pass
    return shutil.which("ptxas")


def unavailable_reason() -> str | None:
    """None when the toolchain is here, else what is missing (install the ``test`` extra)."""
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    from importlib.metadata import version
    from importlib.util import find_spec

    if find_spec("jax_cuda12_plugin") is None:
        return "jax-cuda12-plugin is not installed (pip install -e '.[test]')"

    if version("jax-cuda12-plugin") != version("jaxlib"):
        return (
            f"jax-cuda12-plugin {version('jax-cuda12-plugin')} != jaxlib {version('jaxlib')}: pin the plugin and "
            "jax-cuda12-pjrt to the jax version in pyproject.toml's test extra"
        )
    if find_ptxas() is None:
        return "ptxas not found (package nvidia-cuda-nvcc-cu12)"
    return None


def export_cuda(fn, *args):
    """``jax.export`` of ``jax.jit(fn)`` for CUDA (no device needed); args are ShapeDtypeStructs."""
    import jax
    from jax import export

    return export.export(
        jax.jit(fn),
        platforms=["cuda"],
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*args)


def _walk(op, out):
    from jax._src.lib.mlir import ir

    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                if child.operation.name == "stablehlo.custom_call":
                    target = ir.StringAttr(child.attributes["call_target_name"]).value
                    if target == "__gpu$xla.gpu.triton":
                        out.append(child)
                _walk(child.operation, out)


def triton_calls(exported) -> list[TritonCall]:
    """Every Triton custom call of an exported module, with its IR bytecode and launch config."""
    from jax._src.interpreters import mlir as jmlir
    from jax._src.lib.mlir import ir

    with jmlir.make_ir_context():
        module = ir.Module.parse(exported.mlir_module())
        ops: list = []
        _walk(module.operation, ops)
        calls = []
        for op in ops:
            cfg = ir.DictAttr(op.attributes["mhlo.backend_config"])

            def get(key, cfg=cfg):
                return ir.IntegerAttr(cfg[key]).value

            calls.append(
                TritonCall(
                    name=ir.StringAttr(cfg["name"]).value,
                    ir=ir.StringAttr(cfg["ir"]).value_bytes,
                    num_warps=get("num_warps"),
                    num_stages=get("num_stages"),
                    grid=(get("grid_x"), get("grid_y"), get("grid_z")),
                )
            )
    return calls


_REGS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_sm90(call: TritonCall, *, ptxas: str | None = None) -> Sm90Result:
    """Triton IR -> sm_90a PTX (jaxlib's Triton) -> ptxas -v. Raises RuntimeError on a compile error."""
    import jax
    from jax._src.lib import triton

    jax.devices()  # the CUDA plugin registers its Triton compile handler when backends initialise
    try:
        res = triton.compile("CUDA", call.ir, "9.0", num_warps=call.num_warps, num_ctas=1, num_stages=call.num_stages)
    except Exception as e:  # noqa: BLE001 - reraised with the kernel's name
        raise RuntimeError(f"{call.name}: Triton compile for sm_90a failed: {e}") from e
    ptxas = ptxas or find_ptxas()
    if ptxas is None:
        raise RuntimeError("ptxas not found (package nvidia-cuda-nvcc-cu12)")
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(res.asm)
        p = subprocess.run(
            [ptxas, "-v", "--gpu-name=sm_90a", str(src), "-o", str(Path(d) / "k.cubin")],
            capture_output=True,
            text=True,
            check=False,
        )
    log = p.stdout + p.stderr
    if p.returncode != 0:
        raise RuntimeError(f"{call.name}: ptxas failed: {log.strip()}")
    regs = _REGS.search(log)
    spill = _SPILL.search(log)
    return Sm90Result(
        name=call.name,
        num_warps=call.num_warps,
        num_stages=call.num_stages,
        grid=call.grid,
        registers=int(regs.group(1)) if regs else -1,
        spill_stores=int(spill.group(1)) if spill else 0,
        spill_loads=int(spill.group(2)) if spill else 0,
        smem=int(res.smem_bytes),
        wgmma_serialized="wgmma.mma_async instructions are serialized" in log,
        ptxas_log=log,
    )
