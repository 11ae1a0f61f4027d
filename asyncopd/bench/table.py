"""Fixed-width text tables for the benchmarks and analyses people read in a terminal."""

from collections.abc import Sequence


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """`columns` = (key, header, format spec); the width is the header's or the widest value's."""
    cells = [[format(row[key], spec) for key, _, spec in columns] for row in rows]
    widths = [max([len(head), *(len(c[i]) for c in cells)]) for i, (_, head, _) in enumerate(columns)]
    line = lambda values: "  ".join(v.rjust(w) if i else v.ljust(w)  # noqa: E731
                                    for i, (v, w) in enumerate(zip(values, widths, strict=True)))
    header = line([head for _, head, _ in columns])
    return "\n".join([header, "-" * len(header), *(line(c) for c in cells)])
