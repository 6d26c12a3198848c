"""What a sweep runs: cells (sets of config overrides) × seeds, parsed from the command line or a sweep file.

A *cell* is one setting under comparison, a few `key=value` config overrides
(`selection.strategy=top,selection.ratio=0.2`). Cells come from `--cell` (listed one by one, for
comparisons that are not a cross product, like the paper's all / top-20% / bottom-80% / random-20%)
and `--grid KEY=V1,V2,...` (every combination); both together give each listed cell × the grid.
Each cell runs once per seed. Commas separate values and assignments except inside brackets or
quotes, so `data.train_files=[a.jsonl,b.jsonl]` is one value.

A sweep file is YAML with the same fields as the options (`config`, `cells`, `grid`, `seeds`,
`baseline`, `setup`, `overrides`, `out`, `jobs`, `launcher`); see the README's "Sweeps" section.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from forkrl.config import ConfigError, read_yaml_file

SWEEP_FILE_KEYS = ("config", "cells", "grid", "seeds", "baseline", "setup", "overrides", "out", "jobs", "launcher")


@dataclass(frozen=True)
class Cell:
    """One setting of the comparison: `key=value` overrides, in the order given."""

    assignments: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        """`key=value,key=value` as written (`default` for a cell without overrides)."""
        return ",".join(f"{k}={v}" for k, v in self.assignments) or "default"

    @property
    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.assignments]

    @property
    def slug(self) -> str:
        """Directory name: the name with characters other than letters, digits and `._=,+-` as `_`;
        long names are cut and tagged with a hash of the full name, so two cells never share one."""
        slug = re.sub(r"[^A-Za-z0-9._=,+-]", "_", self.name)
        if slug != self.name or len(slug) > 120:
            slug = f"{slug[:100]}-{hashlib.sha1(self.name.encode()).hexdigest()[:8]}"
        return slug

    def matches(self, other: Cell) -> bool:
        """Every assignment of `other` is one of this cell's (values compared as parsed YAML)."""
        mine = {k: _parsed(v) for k, v in self.assignments}
        return all(k in mine and mine[k] == _parsed(v) for k, v in other.assignments)


def _parsed(value: str) -> Any:
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets, braces and quotes: `a=[1,2],b=3` -> [`a=[1,2]`, `b=3`]."""
    parts, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _assignment(item: str, where: str) -> tuple[str, str]:
    key, eq, value = item.partition("=")
    if not eq or not key.strip() or not value.strip():
        raise ConfigError(f"{where}: expected key=value, got {item!r}")
    return key.strip(), value.strip()


def parse_cell(text: str) -> Cell:
    """`--cell selection.strategy=top,selection.ratio=0.2` -> a Cell."""
    return Cell(tuple(_assignment(item, "--cell") for item in split_top_level(text) if item))


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """`--grid KEY=V1,V2,...` options -> [(key, [values])], one axis per option."""
    axes = []
    for item in items:
        key, values = _assignment(item, "--grid")
        axes.append((key, [v for v in split_top_level(values) if v]))
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--grid: a key appears twice ({', '.join(keys)}); give all its values in one --grid")
    return axes


def expand_cells(cells: list[Cell], grid: list[tuple[str, list[str]]]) -> list[Cell]:
    """Every listed cell × every combination of the grid's values (no cells: the grid alone)."""
    combos = [tuple(zip([k for k, _ in grid], values)) for values in itertools.product(*[v for _, v in grid])]
    out: list[Cell] = []
    for cell in cells or [Cell(())]:
        for combo in combos:
            clash = {k for k, _ in cell.assignments} & {k for k, _ in combo}
            if clash:
                raise ConfigError(f"--cell {cell.name} and --grid both set {', '.join(sorted(clash))}")
            new = Cell(cell.assignments + combo)
            if new not in out:
                out.append(new)
    return out


def parse_seeds(text: str | list[int]) -> list[int]:
    """`0,1,2` or `0-4` (inclusive) or a YAML list -> sorted distinct ints."""
    if isinstance(text, list):
        items = [str(x) for x in text]
    else:
        items = split_top_level(str(text))
    seeds: set[int] = set()
    for item in items:
        m = re.fullmatch(r"(\d+)-(\d+)", item)
        try:
            seeds.update(range(int(m[1]), int(m[2]) + 1) if m else [int(item)])
        except ValueError:
            raise ConfigError(f"--seeds {text!r}: expected integers like 0,1,2 or a range like 0-4") from None
    if not seeds:
        raise ConfigError("--seeds: give at least one seed, e.g. --seeds 0,1,2")
    return sorted(seeds)


def find_baseline(baseline: str, cells: list[Cell]) -> Cell:
    """The one cell that `--baseline key=value[,key=value]` names (all its assignments match)."""
    wanted = parse_cell(baseline)
    exact = [c for c in cells if c.matches(wanted) and wanted.matches(c)]
    found = exact or [c for c in cells if c.matches(wanted)]
    if len(found) != 1:
        names = ", ".join(c.name for c in (found or cells))
        what = "matches several cells" if found else "matches no cell"
        raise ConfigError(f"--baseline {baseline}: {what} (cells: {names}); name one cell exactly")
    return found[0]


@dataclass
class SweepPlan:
    """A whole sweep as given: the training config, what varies, and how to run it."""

    config: str
    """The training recipe every run starts from (YAML, like `forkrl train CONFIG`)."""
    cells: list[Cell]
    seeds: list[int]
    out: Path
    overrides: list[str] = field(default_factory=list)
    """`key=value` overrides applied to every run (before the cell's)."""
    baseline: str | None = None
    setup: str | None = None
    jobs: int = 1
    launcher: str = "local"


def load_sweep_file(path: str) -> dict[str, Any]:
    """The fields of a sweep file, or {} when `path` is a training config (no top-level `config`)."""
    data = read_yaml_file(path) or {}
    if not isinstance(data, dict) or "config" not in data:
        return {}
    unknown = sorted(set(data) - set(SWEEP_FILE_KEYS))
    if unknown:
        raise ConfigError(
            f"{path}: unknown sweep file key(s) {', '.join(unknown)}; valid: {', '.join(SWEEP_FILE_KEYS)}"
        )
    return data


def cells_from_file(entries: list[Any], path: str) -> list[Cell]:
    """`cells:` entries: `key=value,...` strings or `{key: value}` mappings."""
    cells = []
    for i, entry in enumerate(entries or []):
        if isinstance(entry, str):
            cells.append(parse_cell(entry))
        elif isinstance(entry, dict):
            cells.append(Cell(tuple((str(k), _yaml_text(v)) for k, v in entry.items())))
        else:
            raise ConfigError(f"{path}: cells[{i}] = {entry!r}: expected 'key=value,...' or a mapping")
    return cells


def grid_from_file(grid: dict[str, Any] | None, path: str) -> list[tuple[str, list[str]]]:
    if not grid:
        return []
    if not isinstance(grid, dict):
        raise ConfigError(f"{path}: grid: expected a mapping of key: [values]")
    return [(str(k), [_yaml_text(v) for v in (vs if isinstance(vs, list) else [vs])]) for k, vs in grid.items()]


def _yaml_text(value: Any) -> str:
    """A YAML value back as override text (`0.2`, `all-tokens`, `[a, b]`)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def resolve_path(path: str, relative_to: str | None) -> str:
    """`path` as given when it exists from here, else relative to the sweep file's directory."""
    if os.path.exists(path) or relative_to is None or os.path.isabs(path):
        return path
    candidate = os.path.join(os.path.dirname(relative_to), path)
    return candidate if os.path.exists(candidate) else path
