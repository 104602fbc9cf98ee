"""The collectives of a compiled XLA program, read from its HLO text: how many bytes one run moves, and how many
one iteration of each data-dependent loop (a decoding loop) moves.

Each collective counts the bytes of its whole operand as one device sees it before the collective (all-gather: its
result; reduce-scatter: its result times the group; all-reduce, all-to-all, collective-permute: their result), so a
ZeRO-3 step's weight all-gathers and gradient reduce-scatters (or all-reduces) each count the weights' full size.
XLA's CPU backend has no bfloat16 collectives: it converts to float32 and back around them. So a collective counts
in the narrower float type its operand was converted from, and an all-gather, all-to-all or collective-permute whose
every user turns it, same-sized, into a narrower float type counts in that type, as a GPU program moves it. Loops
multiply what their body moves: a `while` with a known trip count (a `scan`) by that count, a data-dependent one
(whose count only the data decides, e.g. a decoding loop that stops at EOS) by `unknown_trip_count`; of a
conditional's branches the costliest counts.

Example:
  >>> compiled = jax.jit(lambda x: x * 2).lower(jnp.ones(4)).compile()
  >>> summarize(compiled.as_text()).total_bytes
  0
"""

from __future__ import annotations

import dataclasses
import math
import re

# Bytes per element of HLO's element types.
_ELEMENT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                  "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# The kinds whose result a GPU compiler converts before moving it when every user converts it to a narrower type
# (XLA's `CollectiveQuantizer` pass).
_QUANTIZABLE = ("all-gather", "all-to-all", "collective-permute")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"\b(" + "|".join(_ELEMENT_BYTES) + r")\[([\d,]*)\]")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


@dataclasses.dataclass(frozen=True)
class Summary:
  """What one run of the program moves.

  Attributes:
    total_bytes: bytes of every collective of one run (loops multiplied out).
    bytes_by_kind: the same, by collective kind (`KINDS`).
    data_dependent_loop_bytes: per iteration, bytes moved inside each data-dependent `while` loop, in program
      order (one entry per such loop, 0 for a loop without collectives).
  """

  total_bytes: int
  bytes_by_kind: dict[str, int]
  data_dependent_loop_bytes: tuple[int, ...]


def _array_bytes(types: str) -> int:
  return sum(_ELEMENT_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
             for dtype, dims in _ARRAY.findall(types))


def _group_size(rest: str) -> int:
  """The devices of one replica group of a collective (its text after the opcode)."""
  named = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
  if named:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", named.group(1)))
    return math.prod(int(sizes[axis]) for axis in re.findall(r"'([^']+)'", named.group(2)))
  iota = re.search(r"replica_groups=\[([\d,]+)\]<=", rest)
  if iota:
    return int(iota.group(1).split(",")[-1])
  listed = re.search(r"replica_groups=\{\{([\d,]*)\}", rest)
  return len(listed.group(1).split(",")) if listed else 1


@dataclasses.dataclass
class _Computation:
  own: dict[str, int] = dataclasses.field(default_factory=dict)  # kind -> bytes of its own collectives
  calls: list[tuple[str, int | None]] = dataclasses.field(default_factory=list)  # (callee, trip count; None: ?)
  branches: list[list[str]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class _Instruction:
  types: str  # its result's type(s)
  opcode: str
  rest: str  # its text after the opcode's parenthesis
  root: bool

  @property
  def operands(self) -> list[str]:
    return re.findall(r"%([\w.\-]+)", self.rest.split(")", 1)[0])

  @property
  def dtype(self) -> str | None:
    """Its one array result's element type (None for a tuple)."""
    arrays = _ARRAY.findall(self.types)
    return arrays[0][0] if len(arrays) == 1 else None


def _elements(types: str) -> list[int]:
  """The sorted dimensions of a one-array type (so a transpose or a reshape to the same sizes compares equal)."""
  return sorted(int(d) for _, dims in _ARRAY.findall(types)[:1] for d in dims.split(",") if d)


def _narrower(dtype: str | None, than: str) -> bool:
  return dtype is not None and dtype[0] in "fb" and _ELEMENT_BYTES[dtype] < _ELEMENT_BYTES[than]


# Opcodes that move or relabel values without changing them.
_MOVES = ("bitcast", "copy", "reshape", "transpose", "slice", "dynamic-slice", "broadcast")


def _rounded_to(name: str, program: dict[str, _Instruction], programs: dict[str, dict[str, _Instruction]]
                ) -> str | None:
  """The narrower float type that instruction `name`'s values were converted from, through operations that only
  move values (`_MOVES`, also inside a fusion), or None."""
  instruction = program.get(name)
  if instruction is None or instruction.dtype is None:
    return None
  dtype = instruction.dtype
  while True:
    if instruction.opcode == "fusion" and (called := _CALLED.search(instruction.rest)):
      program = programs.get(called.group(1), {})
      instruction = next((i for i in program.values() if i.root), None)
    elif instruction.opcode in _MOVES and instruction.operands:
      instruction = program.get(instruction.operands[0])
    else:
      break
    if instruction is None:
      return None
  if instruction.opcode != "convert" or not instruction.operands or instruction.operands[0] not in program:
    return None
  narrow = program[instruction.operands[0]].dtype
  return narrow if _narrower(narrow, dtype) else None


def _moved_bytes(name: str, program: dict[str, _Instruction], programs: dict[str, dict[str, _Instruction]]) -> int:
  """The bytes collective `name` moves, in the narrowest float type its data is known to hold.

  XLA's CPU backend has no bfloat16 collectives: it converts their operands to float32 and their results back,
  where a GPU or TPU program moves bfloat16. So a collective counts in the narrower type its operand was just
  converted from; and an all-gather, all-to-all or collective-permute whose every user only converts its result
  to a narrower type counts in that type, as XLA's GPU compiler moves the conversion before it
  (`CollectiveQuantizer`)."""
  collective = program[name]
  kind = collective.opcode.removesuffix("-start")
  size = _array_bytes(collective.types) * (_group_size(collective.rest) if kind == "reduce-scatter" else 1)
  if collective.opcode.endswith("-start") and collective.types.startswith("("):
    return size // 2  # An async start's result pairs its operand with its output buffer.
  dtype = collective.dtype
  if dtype is None:
    return size
  narrow = [_rounded_to(collective.operands[0], program, programs)] if collective.operands else []
  if kind in _QUANTIZABLE:
    users = [i for i in program.values() if name in i.operands]
    if users and all(i.operands == [name] and _elements(i.types) == _elements(collective.types) for i in users):
      narrow += [i.dtype for i in users] if len({i.dtype for i in users}) == 1 else []
  narrowest = min((t for t in narrow if _narrower(t, dtype)), key=lambda t: _ELEMENT_BYTES[t], default=dtype)
  return size * _ELEMENT_BYTES[narrowest] // _ELEMENT_BYTES[dtype]


def _parse(hlo_text: str) -> tuple[dict[str, _Computation], str]:
  programs: dict[str, dict[str, _Instruction]] = {}
  entry = current = None
  for line in hlo_text.splitlines():
    header = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if header and not line.startswith(" "):
      current = programs.setdefault(header.group(2), {})
      entry = header.group(2) if header.group(1) else entry
      continue
    instruction = _INSTRUCTION.match(line)
    if current is not None and instruction:
      name, types, opcode, rest = instruction.groups()
      current[name] = _Instruction(types, opcode, rest, line.lstrip().startswith("ROOT"))
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text.")
  computations: dict[str, _Computation] = {}
  for computation_name, program in programs.items():
    computation = computations[computation_name] = _Computation()
    for name, instruction in program.items():
      opcode, rest = instruction.opcode, instruction.rest
      kind = opcode.removesuffix("-start")
      if kind in KINDS and not opcode.endswith("-done"):
        computation.own[kind] = computation.own.get(kind, 0) + _moved_bytes(name, program, programs)
      if opcode == "while":
        trip = _TRIP_COUNT.search(rest)
        body = re.search(r"\bbody=%?([\w.\-]+)", rest).group(1)
        computation.calls.append((body, int(trip.group(1)) if trip else None))
        continue
      branches = _BRANCHES.search(rest)
      if branches:
        computation.branches.append(re.findall(r"%?([\w.\-]+)", branches.group(1)))
      elif opcode == "conditional":
        computation.branches.append(re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", rest))
      else:
        computation.calls.extend((callee, 1) for callee in _CALLED.findall(rest))
  return computations, entry


def summarize(hlo_text: str, unknown_trip_count: int = 1) -> Summary:
  """The collectives of one run of a compiled program.

  Args:
    hlo_text: `compiled.as_text()` of a `jax.jit(...).lower(...).compile()`.
    unknown_trip_count: iterations counted for a loop whose count the data decides (e.g. new tokens - 1 for a
      decoding loop).

  Returns:
    A `Summary`.

  Example:
    >>> summarize(jax.jit(lambda x: x).lower(1.0).compile().as_text()).data_dependent_loop_bytes
    ()
    >>> mesh = jax.make_mesh((8,), ("x",))
    >>> split, whole = (jax.NamedSharding(mesh, jax.sharding.PartitionSpec(*axes)) for axes in (("x",), ()))
    >>> gather = jax.jit(lambda x: jax.lax.with_sharding_constraint(x, whole), out_shardings=whole)
    >>> [summarize(gather.lower(jax.device_put(jnp.ones((8, 64), dtype), split)).compile().as_text()).total_bytes
    ...  for dtype in (jnp.float32, jnp.bfloat16)]   # 512 numbers gathered, 4 and 2 bytes each
    [2048, 1024]
  """
  computations, entry = _parse(hlo_text)
  loops: list[int] = []
  cache: dict[str, dict[str, int]] = {}

  def cost(name: str) -> dict[str, int]:
    if name not in cache:
      computation = computations.get(name, _Computation())
      total = dict(computation.own)
      for callee, trips in computation.calls:
        inner = cost(callee)
        if trips is None:
          loops.append(sum(inner.values()))
        for kind, size in inner.items():
          total[kind] = total.get(kind, 0) + size * (unknown_trip_count if trips is None else trips)
      for branches in computation.branches:
        costliest = max((cost(branch) for branch in branches), key=lambda c: sum(c.values()), default={})
        for kind, size in costliest.items():
          total[kind] = total.get(kind, 0) + size
      cache[name] = total
    return cache[name]

  by_kind = cost(entry)
  return Summary(sum(by_kind.values()), {kind: by_kind.get(kind, 0) for kind in KINDS}, tuple(loops))
