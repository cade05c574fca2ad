"""Byte-for-byte comparison of two runs' outputs, apart from the wall times they record.

Label cost (`label_stats.json` "cost", the `cost-*` and `undecided-*` shard lines) records how long sampling and
labelling took; every other byte of a run is deterministic. `comparable` drops the keys ending in
`wall_seconds` from JSON and JSONL files, and leaves every other file, and every other key, as it was.
"""

from __future__ import annotations

import json

WALL = "wall_seconds"


def _drop_wall(value):
    if isinstance(value, dict):
        return {k: _drop_wall(v) for k, v in value.items() if not k.endswith(WALL)}
    if isinstance(value, list):
        return [_drop_wall(v) for v in value]
    return value


def comparable(name: str, data: bytes) -> bytes:
    """`data` of file `name` without its wall times (unchanged when it records none)."""
    if WALL.encode() not in data:
        return data
    if name.endswith(".jsonl"):
        lines = [json.dumps(_drop_wall(json.loads(x)), sort_keys=True) for x in data.decode().splitlines() if x]
        return "\n".join(lines).encode()
    if name.endswith(".json"):
        return json.dumps(_drop_wall(json.loads(data)), sort_keys=True).encode()
    return data
