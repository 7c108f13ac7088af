"""The heads as a table: ``wsi-mil models`` prints it, and the README carries the same rows (a test keeps
them equal). Whether a head localises and has per-class maps is read off the built head; every head
trains under every registered task (the contract test in tests/test_tasks.py)."""

from __future__ import annotations

from .registry import MODELS, create_model

COLUMNS = ("name", "paper", "localises", "uses positions", "per-class maps", "tasks")


def head_rows() -> list[tuple[str, ...]]:
    from ..tasks import TASKS

    rows = []
    for name in sorted(MODELS):
        built = create_model(name, 8, 2)
        yes = {True: "yes", False: "no"}
        rows.append((name, MODELS[name].paper or "-", yes[bool(built.localises)], yes[MODELS[name].uses_positions],
                     yes[bool(built.per_class)], ", ".join(sorted(TASKS))))
    return rows


def markdown_table() -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| `" + row[0] + "` | " + " | ".join(row[1:]) + " |" for row in head_rows()]
    return "\n".join(lines) + "\n"


def text_table() -> str:
    rows = [COLUMNS, *head_rows()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows) + "\n"
