"""The collectives of a compiled XLA program, read from its HLO text: how many bytes one run moves, and how many
one iteration of each data-dependent loop (a decoding loop) moves.

Each collective counts the bytes of its whole operand as one device sees it before the collective (all-gather:
its result; reduce-scatter: its result times the group; all-reduce, all-to-all, collective-permute: their
result), so a ZeRO-3 step's weight all-gathers and gradient reduce-scatters (or all-reduces) each count the
weights' full size. An all-gather, all-to-all or collective-permute whose every user converts its result to a
narrower float type counts in that type, as a GPU program moves it (XLA's CPU backend has no bfloat16
collectives: it converts to float32 and back around them). Loops multiply what their body moves: a `while` with a known trip count (a `scan`) by that
count, a data-dependent one (whose count only the data decides, e.g. a decoding loop that stops at EOS) by
`unknown_trip_count`; of a conditional's branches the costliest counts.

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


def _operands(rest: str) -> list[str]:
  """The operand names of an instruction (its text after the opcode's parenthesis)."""
  return re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])


def _narrowed_bytes(size: int, types: str, users: list[str]) -> int:
  """`size` bytes of a collective whose result is `types`, counted in the narrower float type that every one of
  its `users` (their result types; "" for a user with other operands) converts it to, if they all do.

  XLA's CPU backend runs bfloat16 collectives in float32 between two conversions; XLA's GPU compiler moves a
  conversion that follows an all-gather, all-to-all or collective-permute before it (`CollectiveQuantizer`), so a
  GPU program moves those in the narrower type."""
  arrays = _ARRAY.findall(types)
  if len(arrays) != 1 or not users:
    return size
  dtype, dims = arrays[0]
  narrow = set()
  for user in users:
    user_arrays = _ARRAY.findall(user)
    if len(user_arrays) != 1 or sorted(user_arrays[0][1].split(",")) != sorted(dims.split(",")):
      return size
    narrow.add(user_arrays[0][0])
  (user_dtype,) = narrow if len(narrow) == 1 else (dtype,)
  if user_dtype[0] in "fb" and _ELEMENT_BYTES[user_dtype] < _ELEMENT_BYTES[dtype]:
    return size * _ELEMENT_BYTES[user_dtype] // _ELEMENT_BYTES[dtype]
  return size


def _parse(hlo_text: str) -> tuple[dict[str, _Computation], str]:
  computations: dict[str, _Computation] = {}
  entry = current = None
  instructions: list[tuple[str, str, str, str]] = []  # The current computation's (name, types, opcode, rest).

  def count_collectives():
    for name, types, opcode, rest in instructions:
      kind = opcode.removesuffix("-start")
      if kind not in KINDS or opcode.endswith("-done"):
        continue
      size = _array_bytes(types) * (_group_size(rest) if kind == "reduce-scatter" else 1)
      if opcode.endswith("-start") and types.startswith("("):
        size //= 2  # An async start's result pairs its operand with its output buffer.
      elif kind in _QUANTIZABLE:
        users = [(t, _operands(r)) for _, t, _, r in instructions if name in _operands(r)]
        size = _narrowed_bytes(size, types, [t if operands == [name] else "" for t, operands in users])
      current.own[kind] = current.own.get(kind, 0) + size

  for line in hlo_text.splitlines():
    header = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if header and not line.startswith(" "):
      if current is not None:
        count_collectives()
      instructions = []
      current = computations.setdefault(header.group(2), _Computation())
      entry = header.group(2) if header.group(1) else entry
      continue
    instruction = _INSTRUCTION.match(line)
    if current is None or not instruction:
      continue
    name, types, opcode, rest = instruction.groups()
    instructions.append((name, types, opcode, rest))
    if opcode == "while":
      trip = _TRIP_COUNT.search(rest)
      body = re.search(r"\bbody=%?([\w.\-]+)", rest).group(1)
      current.calls.append((body, int(trip.group(1)) if trip else None))
      continue
    branches = _BRANCHES.search(rest)
    if branches:
      current.branches.append(re.findall(r"%?([\w.\-]+)", branches.group(1)))
    elif opcode == "conditional":
      current.branches.append(re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", rest))
    else:
      current.calls.extend((callee, 1) for callee in _CALLED.findall(rest))
  if current is not None:
    count_collectives()
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text.")
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
