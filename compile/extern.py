"""Hand-written kernels inside an exported step, where IREE's codegen makes many small
dispatches of what one kernel can do (a step's time on a GPU is mostly per-dispatch cost:
bench/dispatch_cost.py), or reads packed 4-bit weights slowly (bench/q4_gemv_cpu.py).

How: `call` leaves a `stablehlo.custom_call @iree_ext_<kernel>` placeholder in the JAX export,
carrying its grid and push constants as attributes; `link` rewrites each into IREE's
`flow.dispatch @<source>::@<kernel>[grid](constants, operands)` and adds a
`hal.executable.source` holding the kernel's object:
- CUDA: its PTX (kernels/<source>.ptx, made by nvcc from the .cu next to it: `make ptx`), as
  in IREE's samples/custom_dispatch/cuda. The bindings are Indirect, as IREE's own: the
  step still only queues its work (tests/test_host_waits.py).
- CPU: an object file that the C compiler makes from kernels/<source>.c when the step is
  linked (cached by digest), called once per workgroup by a small MLIR function that hands it
  the bindings, push constants and workgroup id, as in IREE's samples/custom_dispatch/cpu.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .iree_compile import cache_dir, host_cpu
from .packed import Packed

KERNEL_DIR = Path(__file__).parent / "kernels"
PREFIX = "iree_ext_"


@dataclass(frozen=True)
class Kernel:
    source: str  # CUDA: kernels/<source>.cu and .ptx; CPU: kernels/<source>.c
    threads: int = 1  # CUDA: per block (its __launch_bounds__)
    target: str = "cuda"


# Decode attention shapes (G, KV heads per block, keys per block, head dim) with a kernel of
# their own taking them as compile-time constants (decode_attention.cu's FUSED_KERNELs: the
# partial blocks, then the last ones fold them, in one kernel): Qwen3-0.6B/1.7B, Llama-3.2-1B,
# Llama-3.1-8B/Qwen3-8B, Gemma3-1B, and the test checkpoints' (tests/checkpoints.py: so the
# GPU agreement with the HF oracle runs it). Other shapes take the runtime partial and combine.
SPECIALIZED_ATTENTION = ((2, 2, 16, 128), (4, 2, 16, 64), (4, 2, 16, 128), (4, 1, 8, 256), (2, 2, 16, 32))
# The packed lm_head kernel's hidden sizes (kernels/gemv.cu LM_HEAD): Qwen3-0.6B's 1024 and
# Llama-3.2-1B's 2048, and 896 (Qwen2.5-0.5B), 1152 (Gemma3-1B), 1536 (Qwen2.5-1.5B).
LM_HEAD_K = (896, 1024, 1152, 1536, 2048)

KERNELS = {
    "decode_attn_partial": Kernel("decode_attention", 256),  # G > 2 query heads per KV head
    "decode_attn_partial_g1": Kernel("decode_attention", 256),
    "decode_attn_partial_g2": Kernel("decode_attention", 256),
    "decode_attn_partial_g4": Kernel("decode_attention", 256),
    "decode_attn_combine": Kernel("decode_attention", 128),
    **{"decode_attn_g{}_kb{}_ch{}_d{}".format(*shape): Kernel("decode_attention", 256) for shape in SPECIALIZED_ATTENTION},
    "gemv": Kernel("gemv", 256),
    "gemv_gate": Kernel("gemv", 256),
    **{f"gemv_q4{gate}_{pairs}": Kernel("gemv", 256) for gate in ("", "_gate") for pairs in ("f16", "bf16")},
    **{f"lm_head_q4_k{k}_{pairs}": Kernel("gemv", 256) for k in LM_HEAD_K for pairs in ("f16", "bf16")},
    "dequant_q4": Kernel("gemv", 256),
    "embed_rope_q4": Kernel("step_prologue", 256),
    "sample_token": Kernel("sample", 1024),
    "prefill_attn": Kernel("prefill_attention", 256),
    "prefill_attn_d256": Kernel("prefill_attention", 256),
    "q4_gemv": Kernel("q4_gemv", target="cpu"),
    "q4_gemm": Kernel("q4_gemv", target="cpu"),
    "decode_attn_cpu_partial": Kernel("decode_attention_cpu", target="cpu"),
    "decode_attn_cpu_combine": Kernel("decode_attention_cpu", target="cpu"),
}


def disabled_checks() -> list:
    """What jax.export needs to allow the placeholders."""
    return [jax.export.DisabledSafetyCheck.custom_call(PREFIX + name) for name in KERNELS]


def f32_bits(x: float) -> int:
    """An f32 push constant: the kernel reads the int's bits back with __int_as_float."""
    return int(np.float32(x).view(np.int32))


def packed_operands(w: Packed) -> list:
    """A packed weight as a kernel's operands: words, scales_biases. The words go as int32, the
    same bits: IREE does not legalize a dispatch operand of unsigned type. The pairs go as they
    are (a CUDA kernel reads a 16-bit pair as one 32-bit word, scale in the low half): a
    bitcast of [..., 2] bf16 to int32 became an IREE dispatch per weight and step (2.8 us each,
    ~310 us of a Qwen3-0.6B decode step on an H100)."""
    return [jax.lax.bitcast_convert_type(w.words, jnp.int32), w.scales_biases]


def pairs_16bit(w: Packed) -> bool:
    """Whether w's scale/bias pairs are as CUDA's kernels read them: F16 or BF16."""
    return w.scales_biases.dtype in (jnp.float16, jnp.bfloat16)


def pairs_bf16(w: Packed) -> int:
    """1 where w's pairs are BF16 (the CUDA kernels' constant), 0 for F16."""
    return int(w.scales_biases.dtype == jnp.bfloat16)


def pairs_name(w: Packed) -> str:
    """The suffix of the 4-bit matvec kernels made for w's pairs: bf16 or f16."""
    return "bf16" if pairs_bf16(w) else "f16"


def _like(*arrays) -> tuple:
    """Results shaped as these operands (the ones a kernel writes in place)."""
    return tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays)


def absent(dtype):
    """A one-element stand-in for an operand a kernel's flags tell it not to read."""
    return jnp.zeros((1,), dtype)


def call(name: str, result, operands, *, grid: int, constants: list[int], aliases: dict[int, int] | None = None):
    """A placeholder for kernel `name` on `operands` (device arrays), with `grid` blocks and the
    kernel's int32 push constants, in its argument order. `result`: a ShapeDtypeStruct or a
    tuple of them; `aliases` {operand index: result index} makes those results the operands
    written in place (IREE's tied operands: one read-write binding, no copy)."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; known: {', '.join(KERNELS)}")
    attrs = {f"c{i:02d}": np.int32(c) for i, c in enumerate(constants)}
    return jax.ffi.ffi_call(PREFIX + name, result, input_output_aliases=aliases or {})(*operands, grid=np.int32(grid),
                                                                                      **attrs)


_PLACEHOLDER = re.compile(
    r"^(?P<indent>\s*)(?P<result>%[^\s=]+) = stablehlo\.custom_call @" + PREFIX + r"(?P<name>\w+)\((?P<operands>[^)]*)\)"
    r" \{mhlo\.backend_config = \{(?P<attrs>[^}]*)\}(?P<rest>.*)\} : \((?P<types>[^)]*)\) -> "
    r"(?P<rtype>tensor<[^>]*>|\([^)]*\))")


@dataclass(frozen=True)
class Signature:
    """How a step calls a kernel: push constants, operands, the operands written in place
    (tied to results), results in all."""
    constants: int
    operands: int
    tied: tuple[int, ...] = ()
    results: int = 1

    @property
    def bindings(self) -> int:  # the operands, then the results not tied to one
        return self.operands + self.results - len(self.tied)


def link(mlir: str) -> str:
    """`mlir` with every placeholder made a flow.dispatch of its kernel, and the kernels' sources."""
    used: dict[str, dict[str, Signature]] = {}  # source -> kernel -> how it is called
    lines = mlir.splitlines()
    placeholders = {}
    for i, line in enumerate(lines):
        if f"@{PREFIX}" not in line:
            continue
        m = _PLACEHOLDER.match(line)
        if m is None:
            raise RuntimeError(f"cannot link kernel placeholder: {line.strip()[:200]}")
        placeholders[i] = m
    prefetch = _prefetch_plan(lines, placeholders)
    for i, m in placeholders.items():
        name, ind = m["name"], m["indent"]
        attrs = dict(re.findall(r"(\w+) = (-?\d+) : i32", m["attrs"]))
        consts = [int(attrs[k]) for k in sorted(k for k in attrs if k.startswith("c"))]
        operands = [o.strip() for o in m["operands"].split(",")]
        types = m["types"]
        pre = []
        if i in prefetch:  # the prefetch slots: the last operands and constants
            pre, pf = prefetch[i]
            slots = len(operands) - PREFETCH_SLOTS
            operands[slots:] = [o for o, _, _ in pf]
            type_list = _split_types(types)
            type_list[slots:] = [t for _, t, _ in pf]
            types = ", ".join(type_list)
            consts[-PREFETCH_SLOTS:] = [b for _, _, b in pf]
        rtypes = m["rtype"][1:-1].split(", ") if m["rtype"].startswith("(") else [m["rtype"]]
        aliases = {int(r): int(o) for r, o in re.findall(r"output_tuple_indices = \[(\d+)\], operand_index = (\d+)",
                                                          m["rest"])}
        sig = Signature(len(consts), len(operands), tuple(sorted(aliases.values())), len(rtypes))
        seen = used.setdefault(KERNELS[name].source, {}).setdefault(name, sig)
        if seen != sig:
            raise RuntimeError(f"kernel {name} is called as {sig} here and as {seen} elsewhere")
        # A result tied to an operand is written as that operand's name (IREE's in-place form).
        results = [operands[aliases[r]] if r in aliases else t for r, t in enumerate(rtypes)]
        v = f"%ext{i}"
        out = [f"{ind}{line}" for line in pre] + [f"{ind}{v}_grid = arith.constant {int(attrs['grid'])} : index"]
        out += [f"{ind}{v}_c{j} = arith.constant {c} : i32" for j, c in enumerate(consts)]
        args = ", ".join([f"{v}_c{j}" for j in range(len(consts))] + operands)
        types = ", ".join(["i32"] * len(consts) + [types])
        rtext = results[0] if len(results) == 1 else f"({', '.join(results)})"
        src = KERNELS[name].source
        out.append(f"{ind}{m['result']} = flow.dispatch @{src}::@{name}[{v}_grid]({args}) : ({types}) -> {rtext}")
        lines[i] = "\n".join(out)
    if not used:
        return mlir
    text = "\n".join(lines)
    head_end = text.index("\n", text.index("module @")) + 1
    return text[:head_end] + "".join(_executable(src, kernels) for src, kernels in used.items()) + text[head_end:]


# Matvec kernels (gemv.cu) take PREFETCH_SLOTS operands, and as many byte sizes as their last
# push constants, for the weights of the next matvec in the step, which they request into L2:
# a one-token step's matvecs are latency-bound, and one reads its weights from L2 faster than
# from DRAM (a 4096 x 1024 4-bit gemv on an H100: 5.3 us from L2, 6.1 from DRAM).
PREFETCH_SLOTS = 3
# Larger weights are not requested: well within an L2 (50 MB on an H100, 40 on an A100). The
# last layer's down_proj requesting Qwen3-0.6B's 97 MB lm_head took 14.6 us instead of 5.0
# and saved the lm_head 1.2.
PREFETCH_MAX_BYTES = 32 << 20
MATVEC_WEIGHTS = {name: (1,) if name in ("gemv", "gemv_gate") else (1, 2)  # their weight operands
                  for name in KERNELS if name.startswith("gemv")}
_DEF = re.compile(r"^\s*(%[\w#]+) = (.*)$")
_BITCAST = re.compile(r"^stablehlo\.bitcast_convert (%arg\d+) : ")
_ELEMENT_BYTES = {"f32": 4, "i32": 4, "ui32": 4, "f16": 2, "bf16": 2, "i8": 1, "ui8": 1}


def _split_types(types: str) -> list[str]:
    """A dispatch's operand types, split at the commas outside <...>."""
    out, depth, cur = [], 0, ""
    for ch in types:
        depth += ch == "<"
        depth -= ch == ">"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + [cur.strip()] if cur.strip() else out


def _tensor_bytes(t: str) -> int | None:
    m = re.fullmatch(r"tensor<((?:\d+x)*)(\w+)>", t)
    if m is None or m[2] not in _ELEMENT_BYTES:
        return None
    return int(np.prod([int(d) for d in m[1].split("x") if d], dtype=np.int64)) * _ELEMENT_BYTES[m[2]]


def _prefetch_plan(lines: list[str], placeholders: dict) -> dict:
    """For each matvec placeholder (line index) followed by another matvec: (lines to insert
    before it, [(operand, type, bytes)] * PREFETCH_SLOTS) naming the next one's weights. A weight
    must be usable there: a function argument, a value defined before, or a bitcast of an
    argument (repeated before it under a new name); else that slot stays empty."""
    matvecs = [i for i, m in placeholders.items() if m["name"] in MATVEC_WEIGHTS]
    defs = {}
    for i, line in enumerate(lines):
        d = _DEF.match(line)
        if d:
            defs[d[1]] = (i, d[2])
    plan = {}
    for i, j in zip(matvecs, matvecs[1:]):
        m, nxt = placeholders[i], placeholders[j]
        ops = [o.strip() for o in nxt["operands"].split(",")]
        types = _split_types(nxt["types"])
        dummy_op = [o.strip() for o in m["operands"].split(",")][-1]
        dummy_t = _split_types(m["types"])[-1]
        pre, slots = [], []
        sizes = [_tensor_bytes(types[k]) for k in MATVEC_WEIGHTS[nxt["name"]]]
        if None in sizes or sum(sizes) > PREFETCH_MAX_BYTES:
            sizes = []
        for k, size in zip(MATVEC_WEIGHTS[nxt["name"]], sizes):
            op, t = ops[k], types[k]
            where = defs.get(op)
            if where is not None and where[0] > i:  # defined after this dispatch
                if _BITCAST.match(where[1]) is None:
                    continue
                op = f"%prefetch{i}_{k}"
                pre.append(f"{op} = {where[1].split(' loc(')[0]}")
            slots.append((op, t, size))
        slots += [(dummy_op, dummy_t, 0)] * (PREFETCH_SLOTS - len(slots))
        plan[i] = (pre, slots)
    return plan


def _layout(sig: Signature) -> str:
    """Push constants, then the operands (read-only, but for those written in place) and the
    results not tied to an operand, as bindings.

    Indirect, as IREE marks its own dispatches' bindings: the step's command buffer then takes
    its buffers from a binding table at each call and is recorded once. A direct binding of a
    per-call buffer made IREE record all ~190 dispatches again on every call, ~1.5 ms of host
    time in a Qwen3-0.6B decode step on an H100."""
    read_only, written = '#hal.pipeline.binding<storage_buffer, "ReadOnly|Indirect">', "#hal.pipeline.binding<storage_buffer, Indirect>"
    bindings = [written if i in sig.tied else read_only for i in range(sig.operands)]
    bindings += [written] * (sig.results - len(sig.tied))
    return f"#hal.pipeline.layout<constants = {sig.constants}, bindings = [{', '.join(bindings)}]>"


def _export(name: str, ordinal: int, layout: str, workgroup_size: str = "") -> str:
    return f"""
    hal.executable.export public @{name} ordinal({ordinal}) layout({layout})
        count(%device: !hal.device, %grid: index) -> (index, index, index) {{
      %c1 = arith.constant 1 : index
      hal.return %grid, %c1, %c1 : index, index, index
    }}{workgroup_size}"""


def _executable(source: str, kernels: dict[str, Signature]) -> str:
    """The hal.executable.source of kernels/<source> exporting `kernels` (name -> how it is called)."""
    target = {KERNELS[name].target for name in kernels}.pop()
    if target == "cpu":
        return _cpu_executable(source, kernels)
    ptx = checked_ptx(source)
    exports = []
    for ordinal, (name, sig) in enumerate(kernels.items()):
        if _bindings(ptx, name) != sig.constants + sig.bindings:
            raise RuntimeError(f"{ptx}: kernel {name} takes {_bindings(ptx, name)} parameters, the step passes "
                               f"{sig.constants} push constants and {sig.bindings} bindings")
        exports.append(_export(name, ordinal, _layout(sig),
                               f" <workgroup_size = [{KERNELS[name].threads} : index, 1 : index, 1 : index]>"))
    return f"""  hal.executable.source private @{source} <{{objects = #hal.executable.objects<{{
      #hal.executable.target<"cuda", "cuda-nvptx-fb"> = [#hal.executable.object<{{path = "{ptx.resolve()}"}}>]}}>}}> {{{"".join(exports)}
  }}
"""


def _cpu_executable(source: str, kernels: dict[str, Signature]) -> str:
    """The llvm-cpu executable of kernels/<source>.c: per kernel an export whose function calls
    the C function `<name>_workgroup(binding, byte offset, ..., push constants, workgroup id)`."""
    obj = cpu_object(source)
    exports, funcs = [], []
    for ordinal, (name, sig) in enumerate(kernels.items()):
        if sig.tied or sig.results != 1:
            raise RuntimeError(f"CPU kernel {name}: one result and no operand written in place, as the shim passes them")
        layout, n_consts = _layout(sig), sig.constants
        exports.append(_export(name, ordinal, layout))
        nb = sig.bindings
        params = [f"%b{i}: memref<i8>, %o{i}: index" for i in range(nb)] + [f"%k{j}: i32" for j in range(n_consts)]
        body = [f"%k{j} = hal.interface.constant.load layout({layout}) ordinal({j}) : i32" for j in range(n_consts)]
        for i in range(nb):
            body += [f"%m{i} = hal.interface.binding.subspan layout({layout}) binding({i}) alignment(64) "
                     f"offset(%c0) : memref<?xi8>{{%c1}}",
                     f"%b{i}, %o{i}, %z{i}, %t{i} = iree_codegen.extract_strided_metadata %m{i} "
                     f": memref<?xi8> -> memref<i8>, index, index, index"]
        args = [f"%b{i}, %o{i}" for i in range(nb)] + [f"%k{j}" for j in range(n_consts)] + ["%wg"]
        types = ["memref<i8>, index"] * nb + ["i32"] * n_consts + ["index"]
        funcs.append(f"""
      func.func private @{name}_workgroup({", ".join(params)}, %wg: index)
          attributes {{hal.import.static, llvm.bareptr = true}}
      func.func @{name}() {{
        %c0 = arith.constant 0 : index
        %c1 = arith.constant 1 : index
        %wg = hal.interface.workgroup.id[0] : index
        {(chr(10) + "        ").join(body)}
        func.call @{name}_workgroup({", ".join(args)}) : ({", ".join(types)}) -> ()
        return
      }}""")
    return f"""  hal.executable.source private @{source} <{{objects = #hal.executable.objects<{{
      #hal.executable.target<"llvm-cpu", "embedded-elf-x86_64"> = [#hal.executable.object<{{path = "{obj}"}}>]}}>}}> {{{"".join(exports)}
    builtin.module {{{"".join(funcs)}
    }}
  }}
"""


# IREE links the object into its embedded ELF, which has no libc: freestanding, no calls to
# memset/memcpy for loops, a*b+c contracted to FMA (ISO C mode turns that off). -march=native
# matches the step's --iree-llvmcpu-target-cpu=host.
CC = ("-O3", "-march=native", "-std=c17", "-ffp-contract=fast", "-fno-math-errno", "-ffreestanding", "-fno-stack-protector",
      "-fPIC", "-fvisibility=hidden", "-fno-plt", "-fdata-sections", "-ffunction-sections",
      "-fno-tree-loop-distribute-patterns", "-c")


def cpu_object(source: str) -> Path:
    """kernels/<source>.c compiled for this CPU, cached under the artifact cache by digest."""
    src = KERNEL_DIR / f"{source}.c"
    cc = os.environ.get("CC", "gcc")
    key = hashlib.sha256(src.read_bytes() + " ".join((cc, *CC, host_cpu())).encode()).hexdigest()[:16]
    obj = cache_dir() / "kernels" / f"{source}-{key}.o"
    if obj.exists():
        return obj
    obj.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".o", dir=obj.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *CC, str(src), "-o", tmp], capture_output=True, text=True)
    except FileNotFoundError:
        os.unlink(tmp)
        raise RuntimeError(f"the CPU kernels (compile/kernels/{source}.c) need a C compiler: no {cc!r} here; "
                           "install gcc, set CC, or compile with --no-kernels") from None
    if proc.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"{cc} failed on {src}:\n{proc.stderr[-4000:]}")
    os.replace(tmp, obj)
    return obj


def _bindings(ptx: Path, name: str) -> int:
    """How many parameters kernel `name` takes in the PTX (bindings + push constants)."""
    m = re.search(r"\.entry " + name + r"\((.*?)\)", ptx.read_text(), re.S)
    if m is None:
        raise RuntimeError(f"{ptx}: no kernel {name}")
    return m[1].count(".param")


# The PTX is committed (compiling a bundle needs no nvcc) and names the digest of the .cu it
# was made from, so a stale one is refused.
NVCC = ("nvcc", "-ptx", "-arch=sm_80", "-O3")  # sm_80 as the rest of the step (iree_compile.py)
# nvcc 13 declares PTX ISA 9.0, which only CUDA 13 drivers load; IREE 3.13's own PTX for sm_80
# declares 7.6. The kernels are declared 7.6 too (ptxas checks them against it when they are
# made), so any driver that runs the rest of the step runs them.
PTX_ISA = "7.6"


_INCLUDE = re.compile(r'^#include "([^"]+)"', re.M)


def _source_files(name: str, seen: list[str] | None = None) -> list[str]:
    """kernels/<name> and the local headers it includes, recursively, each once."""
    seen = [] if seen is None else seen
    if name not in seen:
        seen.append(name)
        for inc in _INCLUDE.findall((KERNEL_DIR / name).read_text()):
            _source_files(inc, seen)
    return seen


def _source_digest(source: str) -> str:
    """The digest of <source>.cu with the headers it includes (common.cuh, ...)."""
    h = hashlib.sha256()
    for name in _source_files(f"{source}.cu"):
        h.update((KERNEL_DIR / name).read_bytes())
    return h.hexdigest()


def make_ptx(source: str) -> Path:
    """kernels/<source>.ptx from its .cu with nvcc, headed by the source's digest; kept as it
    is when it was made from the current source. (nvcc 13 does not always give the same text
    for the same source: gemv.cu's came out in two register numberings. What was measured
    stays what is committed.)"""
    ptx = KERNEL_DIR / f"{source}.ptx"
    if ptx.exists() and _made_from_current(ptx, source):
        return ptx
    proc = subprocess.run([*NVCC, str(KERNEL_DIR / f"{source}.cu"), "-o", "-"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source}.cu:\n{proc.stderr[-4000:]}")
    text = re.sub(r"^\.version \d+\.\d+$", f".version {PTX_ISA}", proc.stdout, count=1, flags=re.M)
    # nvcc 13 marks a vector load whose lanes are partly used with a hint that needs ISA 8.3;
    # a hint only, so it goes.
    text = re.sub(r'^\s*\.pragma "used_bytes_mask \d+";\n', "", text, flags=re.M)
    check = subprocess.run(["ptxas", "-arch=sm_80", "-", "-o", "/dev/null"], input=text, capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"{source}.cu does not assemble as PTX ISA {PTX_ISA}:\n{check.stderr[-4000:]}")
    ptx.write_text(f"// made from {source}.cu, sha256 {_source_digest(source)}: make ptx\n{text}")
    return ptx


def _made_from_current(ptx: Path, source: str) -> bool:
    """Whether the PTX's header names the digest of <source>.cu as it is now."""
    return _source_digest(source) in ptx.read_text().split("\n", 1)[0]


def checked_ptx(source: str) -> Path:
    ptx = KERNEL_DIR / f"{source}.ptx"
    if not ptx.exists():
        raise FileNotFoundError(f"{ptx}: the kernel's PTX is missing (make ptx)")
    if not _made_from_current(ptx, source):
        raise RuntimeError(f"{ptx} was not made from the current {source}.cu (make ptx)")
    return ptx


# --- decode attention (kernels/decode_attention.cu) ---------------------------------------

KEYS_PER_BLOCK = 16  # cached keys per partial block
COMPILED_G = (1, 2, 4)  # query heads per KV head with a partial kernel of their own (decode_attn_partial_g<G>)
# The kernel's shared-memory bounds (its MAX_* defines).
MAX_Q, MAX_P, MAX_KV, MAX_G, MAX_B = 2048, 1024, 4096, 8, 1024


def _specialized(g: int, head_dim: int, kv_heads: int) -> tuple | None:
    """The attention shape (G, KV heads per block, keys per block, head dim), if its kernels are specialized."""
    shape = (g, kv_heads_per_block(kv_heads), keys_per_block(head_dim, kv_heads), head_dim)
    return shape if shape in SPECIALIZED_ATTENTION else None


def fused_kernel(g: int, head_dim: int, kv_heads: int) -> str | None:
    """The one-kernel decode attention of a specialized shape; None: the shape takes
    partial_kernel, then decode_attn_combine."""
    if shape := _specialized(g, head_dim, kv_heads):
        return "decode_attn_g{}_kb{}_ch{}_d{}".format(*shape)
    return None


def partial_kernel(g: int) -> str:
    """The runtime-shape decode attention's partial kernel: the one for g query heads per KV
    head, else the runtime form."""
    return f"decode_attn_partial_g{g}" if g in COMPILED_G else "decode_attn_partial"


def kv_heads_per_block(kv_heads: int) -> int:
    """KV heads per partial block: pairs (32-bit loads) where KVH is even."""
    return 2 if kv_heads % 2 == 0 else 1


def keys_per_block(head_dim: int, kv_heads: int) -> int:
    """Cached keys per partial block: KEYS_PER_BLOCK, halved while a block's keys would not fit
    the kernel's staging registers (MAX_KV halves for pairs of KV heads, MAX_KV / 2 for single
    ones: Gemma3-1B's one KV head of 256 features takes 8). Before this, such a block staged
    half its keys and read garbage for the rest."""
    kb, ch = kv_heads_per_block(kv_heads), KEYS_PER_BLOCK
    while ch > 1 and head_dim * ch * kb > _staged_halves(kb):
        ch //= 2
    return ch


def _staged_halves(kb: int) -> int:
    """How many cached halves a partial block stages (decode_attention.cu load_rows)."""
    return MAX_KV if kb % 2 == 0 else MAX_KV // 2


def decode_attention_fits(heads: int, kv_heads: int, head_dim: int, rows: int) -> bool:
    """Whether the kernel takes this shape (rows: the cache's S); else the attention stays in JAX."""
    ch, kb, g = keys_per_block(head_dim, kv_heads), kv_heads_per_block(kv_heads), heads // kv_heads
    return (kb * g * head_dim <= MAX_Q and kb * g * (ch + 1) <= MAX_P and head_dim * ch * kb <= _staged_halves(kb)
            and head_dim <= 256 and head_dim % 32 == 0 and ch <= 32
            and g <= MAX_G and rows % ch == 0 and rows // ch <= MAX_B)


def decode_attention(qkv, cos, sin, k_cache, v_cache, positions, *, heads: int, layer: int, scale: float,
                     window: int | None, softcap: float | None, qk_norm=None, sync=None, rows: int | None = None):
    """Attention of one query token from the qkv projection's output [(H + 2 KVH) Dh] (f32),
    rotary cos/sin [rot] and the caches [L, Dh, S, KVH] f16 (rows < positions[0] valid).
    qk_norm = (q weight_rope [2, Dh], k weight_rope, eps, one_plus): per-head RMSNorm of q and k
    before rotary (compile/layers.py rms_norm_rope). Returns the attention output [H * Dh] f32,
    the caches with the token's key (normed and rotated) and value written at row positions[0]
    of the layer, in place, and `sync`.

    sync: the specialized shapes' one kernel (fused_kernel) counts each layer's finished blocks
    in it ([L * KVH / KB] int32, zero at the step's start: pass None at the first layer, then
    what the previous layer returned; it is written in place). None for the other shapes.

    rows: the positions the token can be at (positions[0] < rows), None: the cache's S; blocks
    are launched for these rows only."""
    _, Dh, S, KVH = k_cache.shape
    H = heads
    f16, f32 = jnp.float16, jnp.float32
    if qk_norm is None:
        wq = wk = absent(f16)
        qk, eps = 0, 0.0
    else:
        wq, wk, eps, one_plus = qk_norm
        wq, wk, qk = wq.astype(f16), wk.astype(f16), 1 | (2 if one_plus else 0)
    kb = kv_heads_per_block(KVH)
    ch = keys_per_block(Dh, KVH)
    consts = [S, KVH, H // KVH, Dh, layer, ch, window or 0, f32_bits(scale), f32_bits(softcap or 0.0),
              qk, f32_bits(eps), cos.shape[-1], kb]
    blocks = -(-min(rows or S, S) // ch)
    qkv, cos, sin = qkv.astype(f32), cos.astype(f32), sin.astype(f32)
    G = H // KVH
    part_shape = jax.ShapeDtypeStruct((blocks, H, Dh + 2), f32)
    if fused := fused_kernel(G, Dh, KVH):
        if sync is None:
            sync = jnp.zeros((k_cache.shape[0] * (KVH // kb),), jnp.int32)
        out, _, k_cache, v_cache, sync = call(
            fused, (jax.ShapeDtypeStruct((H * Dh,), f32), part_shape, *_like(k_cache, v_cache, sync)),
            [qkv, wq, wk, cos, sin, k_cache, v_cache, positions, sync], grid=blocks * (KVH // kb), constants=consts,
            aliases={5: 2, 6: 3, 8: 4})
        return out, k_cache, v_cache, sync
    part = call(partial_kernel(G), part_shape, [qkv, wq, cos, sin, k_cache, v_cache, positions],
                grid=blocks * (KVH // kb), constants=consts)
    return (*call("decode_attn_combine", (jax.ShapeDtypeStruct((H * Dh,), f32), *_like(k_cache, v_cache)),
                  [qkv, wq, wk, cos, sin, positions, part, k_cache, v_cache], grid=H * Dh // 32, constants=consts,
                  aliases={7: 1, 8: 2}), None)


# --- prefill attention (kernels/prefill_attention.cu) -------------------------------------

# (entry point, query rows (token, head) a block: its ROWS) by the largest head dim it takes:
# prefill_attn_d256 (Gemma3's 256) has half the rows a block, so that its tiles fit the 48 KB of
# shared memory a kernel may declare.
PREFILL_KERNELS = {128: ("prefill_attn", 16), 256: ("prefill_attn_d256", 8)}
PREFILL_MAX_DH = max(PREFILL_KERNELS)


def prefill_attention_fits(head_dim: int) -> bool:
    """Whether a prefill kernel takes this head dim; else the chunk's attention stays in JAX."""
    return head_dim % 32 == 0 and head_dim <= PREFILL_MAX_DH


def prefill_kernel(head_dim: int) -> tuple[str, int]:
    """The prefill attention entry point for this head dim and its query rows a block."""
    return PREFILL_KERNELS[min(d for d in PREFILL_KERNELS if d >= head_dim)]


def prefill_attention(q, k, v, k_cache, v_cache, positions, *, layer: int, scale: float, window: int | None,
                      softcap: float | None):
    """Attention of a chunk of C tokens at consecutive positions: q [C, H, Dh], the chunk's k, v
    [C, KVH, Dh] (normed and rotated; f32) against the caches [L, Dh, S, KVH] f16 (rows <
    positions[0] valid) and the chunk itself, causal. Returns [C, H * Dh] f32 and the caches
    with the chunk's keys and values written at rows positions of the layer, in place."""
    C, H, Dh = q.shape
    _, _, S, KVH = k_cache.shape
    f32 = jnp.float32
    consts = [C, S, KVH, H // KVH, Dh, layer, window or 0, f32_bits(scale), f32_bits(softcap or 0.0)]
    name, rows = prefill_kernel(Dh)
    tiles = -(-C * (H // KVH) // rows)
    return call(name, (jax.ShapeDtypeStruct((C, H * Dh), f32), *_like(k_cache, v_cache)),
                [q.astype(f32), k.astype(f32), v.astype(f32), k_cache, v_cache, positions],
                grid=tiles * KVH, constants=consts, aliases={3: 1, 4: 2})


# --- decode attention on the CPU (kernels/decode_attention_cpu.c) --------------------------

CPU_ROWS = 32  # cached keys per partial workgroup (the kernel's ROWS)
CPU_MAX_Q, CPU_MAX_H = 4096, 64


def cpu_decode_attention_fits(heads: int, head_dim: int, softcap) -> bool:
    """Whether the CPU kernel takes this attention (no soft-cap: it has no tanh)."""
    return softcap is None and heads * head_dim <= CPU_MAX_Q and heads <= CPU_MAX_H


def cpu_decode_attention(q, k, v, k_cache, v_cache, positions, *, layer: int, scale: float, window: int | None):
    """Attention of one query token on the CPU: q [H, Dh] (normed and rotated), the token's own
    k, v [KVH, Dh] and the f32 caches [L, S, Dh, KVH] (rows < positions[0] valid) -> [H * Dh] f32."""
    _, S, Dh, KVH = k_cache.shape
    H = q.shape[0]
    f32 = jnp.float32
    consts = [S, KVH, H // KVH, Dh, layer, window or 0, f32_bits(scale)]
    blocks = -(-S // CPU_ROWS)
    q = q.reshape(-1).astype(f32)
    part = call("decode_attn_cpu_partial", jax.ShapeDtypeStruct((blocks, H, Dh + 2), f32),
                [q, k_cache, v_cache, positions], grid=blocks, constants=consts)
    return call("decode_attn_cpu_combine", jax.ShapeDtypeStruct((H * Dh,), f32),
                [q, k.reshape(-1).astype(f32), v.reshape(-1).astype(f32), part], grid=H, constants=consts)


# --- one-token linear layers (kernels/gemv.cu, kernels/q4_gemv.c) -------------------------

GEMV_WARPS = 8  # per block: one output each
GEMV_MAX_K = 8192
NORM, ONE_PLUS, BIAS, RESIDUAL, GATE, GELU = 1, 2, 4, 8, 16, 32  # the kernel's flags
PAIRS_F16, PAIRS_BF16 = 64, 128  # the CPU kernels' flags for 16-bit pairs (kernels/q4_gemv.c; else f32)
# A packed lm_head (many rows, K one of LM_HEAD_K): lm_head_q4_k<K>_<pairs>, its blocks looping over
# chunks of rows. Its grid: one wave of 2 blocks per SM on an H100 / H200 (132 SMs); any grid is correct.
LM_HEAD_ROWS, LM_HEAD_GRID = 32768, 264  # grid <= 1024: the kernel's argmax
Q4_GROUP = 64  # the group size both 4-bit kernels read


def _q4_fits(w, max_k: int, cuda: bool) -> bool:
    """Whether w is what the 4-bit kernels read: Packed, 2-D, 4 bits in groups of 64, K <= max_k,
    with the target's scale/bias pairs (F16 or BF16 as stored; the CPU's also f32)."""
    return (isinstance(w, Packed) and w.ndim == 2 and w.bits == 4 and w.group_size == Q4_GROUP
            and w.shape[1] <= max_k and (pairs_16bit(w) or not cuda and w.scales_biases.dtype == jnp.float32))


def gemv_fits(w) -> bool:
    """Whether the CUDA kernel takes weight w ([N, K] f16, or Packed 4-bit in groups of 64 with
    F16 or BF16 pairs); else the linear stays in JAX."""
    if isinstance(w, Packed):
        return _q4_fits(w, GEMV_MAX_K, cuda=True)
    return w.ndim == 2 and w.dtype == jnp.float16 and w.shape[1] % 8 == 0 and w.shape[1] <= GEMV_MAX_K


def gemv(x, w, *, bias=None, norm=None, residual=None, gate: str | None = None):
    """w [N, K] · x [K] (f32) -> [N] f32 on CUDA, w f16 or Packed 4-bit, with, folded into the
    one kernel:
    - norm = (weight [K], eps, one_plus): x is RMS-normed first;
    - bias [N]; residual [N], added last;
    - gate "silu" or "gelu_tanh": w's rows are [gate; up], and the result is act(gate) * up [N / 2]."""
    n_rows, k = w.shape
    n = n_rows // 2 if gate else n_rows
    if gate not in (None, "silu", "gelu_tanh"):
        raise ValueError(f"gate activation {gate!r}: silu or gelu_tanh")
    operands = [x.astype(jnp.float32), *(packed_operands(w) if isinstance(w, Packed) else [w])]
    flags, folded = _folded(norm, bias, residual, jnp.float16)
    flags |= (GATE if gate else 0) | (GELU if gate == "gelu_tanh" else 0)
    name = ("gemv_q4" if isinstance(w, Packed) else "gemv") + ("_gate" if gate else "")
    if isinstance(w, Packed):  # the pairs' dtype is the kernel's own (gemv.cu GEMV_Q4)
        name += "_" + pairs_name(w)
    grid = -(-n // GEMV_WARPS)
    # The prefetch slots: placeholders that link() fills with the next matvec's weights.
    return call(name, jax.ShapeDtypeStruct((n,), jnp.float32), operands + folded + [absent(jnp.float32)] * PREFETCH_SLOTS,
                grid=grid, constants=[n, k, flags, f32_bits(0.0 if norm is None else norm[1])] + [0] * PREFETCH_SLOTS)


def lm_head_fits(w) -> bool:
    """Whether the CUDA lm_head kernel takes w: Packed 4-bit in groups of 64 with F16 or BF16
    pairs, many rows, K one of LM_HEAD_K."""
    return _q4_fits(w, max(LM_HEAD_K), cuda=True) and w.shape[0] >= LM_HEAD_ROWS and w.shape[1] in LM_HEAD_K


def lm_head(x, w: Packed, *, norm=None):
    """(logits w · x [N] f32, their first argmax [] int32: N where one is NaN, as
    layers.max_and_first_index) on CUDA, x [K] f32 RMS-normed first with norm = (weight [K],
    eps, one_plus), in one kernel (kernels/gemv.cu lm_head_q4_k<K>_<f16|bf16>: the pairs' dtype)."""
    n, k = w.shape
    flags, (norm_w, _, _) = _folded(norm, None, None, jnp.float16)
    f32 = jnp.float32
    logits, argmax, _, _ = call(
        f"lm_head_q4_k{k}_{pairs_name(w)}", (jax.ShapeDtypeStruct((n,), f32), jax.ShapeDtypeStruct((1,), jnp.int32),
                             jax.ShapeDtypeStruct((LM_HEAD_GRID, 2), f32), jax.ShapeDtypeStruct((1,), jnp.int32)),
        [x.astype(f32), *packed_operands(w), norm_w, jnp.zeros((1,), jnp.int32)], grid=LM_HEAD_GRID,
        constants=[n, k, flags, f32_bits(0.0 if norm is None else norm[1])], aliases={4: 3})
    return logits, argmax[0]


def embed_rope_fits(table) -> bool:
    """Whether the CUDA prologue kernel reads this embedding table: Packed 2-D 4-bit, groups a
    multiple of 8, F16 or BF16 pairs."""
    return (isinstance(table, Packed) and table.ndim == 2 and table.bits == 4 and table.group_size % 8 == 0
            and pairs_16bit(table))


def embed_rope(table: Packed, tokens, positions, inv_freq: np.ndarray):
    """One token's embedding row [1, D] f32 (dequantized from 4-bit) and rotary cos, sin
    [1, rot] f32 of its position (layers.rope_cos_sin), in one kernel (kernels/step_prologue.cu)."""
    D, half, f32 = table.shape[1], inv_freq.shape[0], jnp.float32
    x, cos, sin = call("embed_rope_q4", (jax.ShapeDtypeStruct((D,), f32), *[jax.ShapeDtypeStruct((2 * half,), f32)] * 2),
                       [tokens, positions, jnp.asarray(inv_freq, f32), *packed_operands(table)], grid=1,
                       constants=[D, half, table.group_size, pairs_bf16(table)])
    return x[None], cos[None], sin[None]


SAMPLE_PER_BLOCK, SAMPLE_TOP, SAMPLE_MAX_BLOCKS = 2048, 16, 128  # kernels/sample.cu PER_BLOCK, TOP, MAX_BLOCKS


def sample_fits(vocab: int) -> bool:
    """Whether the CUDA sampling kernel takes a vocabulary this large."""
    return -(-vocab // SAMPLE_PER_BLOCK) <= SAMPLE_MAX_BLOCKS


def sample_token(logits, argmax, sampling, start, last, tokens, history):
    """([token, status] int32, history) on CUDA (kernels/sample.cu): the argmax where sampling
    (the [8] int32 of sampling.device_params) has temperature 0 (with a repetition penalty, the
    penalized logits'), else a token drawn from the logits [V] f32 as the host's sampler draws
    it (after the penalty over the sequence so far: history[:start] and tokens[:last + 1]), with
    the uniform number of (seed,
    start + last); status 1 where the kernel leaves the draw to the host. history [S] int32 (the
    sequence's tokens by position) comes back with the step's tokens at start.., in place."""
    v = logits.shape[0]
    grid = -(-v // SAMPLE_PER_BLOCK)
    i32 = jnp.int32
    out, _, _, _, history = call(
        "sample_token", (jax.ShapeDtypeStruct((2,), i32), jax.ShapeDtypeStruct((1,), i32),
                         jax.ShapeDtypeStruct((grid * SAMPLE_TOP, 2), jnp.float32),
                         jax.ShapeDtypeStruct((grid, 4), jnp.float32),  # 2 doubles a block
                         *_like(history)),
        [logits, jnp.reshape(argmax, (1,)).astype(i32), sampling, jnp.reshape(start, (1,)), jnp.reshape(last, (1,)),
         jnp.zeros((1,), i32), tokens.astype(i32), history], grid=grid, constants=[v], aliases={5: 1, 7: 4})
    return out, history


def dequant_q4_fits(w) -> bool:
    """Whether the CUDA dequantizing kernel takes w: Packed 2-D 4-bit, groups a multiple of 8,
    F16 or BF16 pairs, dequantized to f16 (with f32 weights the graph dequantizes it, in f32)."""
    return (isinstance(w, Packed) and w.ndim == 2 and w.bits == 4 and w.group_size % 8 == 0
            and w.dtype == jnp.float16 and pairs_16bit(w))


def dequant_q4(w: Packed):
    """w dequantized to f16 [N, K] on CUDA (kernels/gemv.cu), for a several-token matmul."""
    n, k = w.shape
    return call("dequant_q4", jax.ShapeDtypeStruct((n, k), jnp.float16), packed_operands(w),
                grid=-(-(n * k // 8) // KERNELS["dequant_q4"].threads), constants=[n, k, w.group_size, pairs_bf16(w)])


def _folded(norm, bias, residual, dtype) -> tuple[int, list]:
    """The flags and trailing operands of what a one-token linear kernel folds in (gemv,
    q4_gemv): the norm weight and bias in `dtype` (absent where not given), the residual in f32."""
    flags = (NORM if norm is not None else 0) | (ONE_PLUS if norm is not None and norm[2] else 0)
    flags |= (BIAS if bias is not None else 0) | (RESIDUAL if residual is not None else 0)
    f32 = jnp.float32
    return flags, [absent(dtype) if norm is None else norm[0].astype(dtype),
                   absent(dtype) if bias is None else bias.astype(dtype),
                   absent(f32) if residual is None else residual.astype(f32)]


Q4_TILE = 64  # rows per CPU workgroup (kernels/q4_gemv.c TILE)
Q4_MAX_K = 8192


def _cpu_pairs(w: Packed) -> int:
    """The CPU kernels' flag for w's scale/bias pairs: PAIRS_F16, PAIRS_BF16, or 0 (f32)."""
    return (PAIRS_BF16 if pairs_bf16(w) else PAIRS_F16) if pairs_16bit(w) else 0


def q4_gemv_fits(w) -> bool:
    """Whether the CPU kernel takes w: Packed 4-bit, groups of 64, f32, F16 or BF16 pairs, K % 128 == 0, K <= 8192."""
    return _q4_fits(w, Q4_MAX_K, cuda=False) and w.shape[1] % 128 == 0


Q4_GEMM_TILE, Q4_GEMM_MAX_K = 32, 4096  # kernels/q4_gemv.c GEMM_TILE, GEMM_KMAX


def q4_gemm_fits(w) -> bool:
    """Whether the CPU's several-token kernel takes w: Packed 4-bit, groups of 64, f32, F16 or BF16 pairs, K <= 4096."""
    return _q4_fits(w, Q4_GEMM_MAX_K, cuda=False)


def q4_gemm(x, w: Packed):
    """x [C, K] @ dequant(w)^T -> [C, N] f32 on the CPU, w read packed (kernels/q4_gemv.c)."""
    n, k = w.shape
    c = x.shape[0]
    return call("q4_gemm", jax.ShapeDtypeStruct((c, n), jnp.float32),
                [*packed_operands(w), x.astype(jnp.float32)], grid=-(-n // Q4_GEMM_TILE),
                constants=[n, k, c, _cpu_pairs(w)])


def q4_gemv(x, w: Packed, *, bias=None, norm=None, residual=None):
    """dequant(w) [N, K] · x [K] -> [N] f32 on the CPU, w read packed (kernels/q4_gemv.c), with
    norm = (weight [K], eps, one_plus), bias [N] and residual [N] folded in as in gemv."""
    n, k = w.shape
    operands = [*packed_operands(w), x.astype(jnp.float32)]
    flags, folded = _folded(norm, bias, residual, jnp.float32)
    return call("q4_gemv", jax.ShapeDtypeStruct((n,), jnp.float32), operands + folded, grid=-(-n // Q4_TILE),
                constants=[n, k, flags | _cpu_pairs(w), f32_bits(0.0 if norm is None else norm[1])])


if __name__ == "__main__":  # make ptx
    for src in sorted({k.source for k in KERNELS.values() if k.target == "cuda"}):
        print(f"{make_ptx(src)} (made from the current {src}.cu)", file=sys.stderr)
