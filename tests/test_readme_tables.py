"""The README's tables that come from the code are today's (``python -m
sparsefx.readme_tables README.md`` rewrites them)."""
from pathlib import Path

from sparsefx.readme_tables import TABLES, markers, with_tables
from sparsefx.registry import PATTERNS

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_generated_tables_are_current():
    text = README.read_text()
    for name in TABLES:
        begin, end = markers(name)
        assert text.count(begin) == 1 and text.count(end) == 1, name
    assert text == with_tables(text), ("the README's generated tables are stale: run "
                                       "python -m sparsefx.readme_tables README.md")


def test_the_patterns_table_has_every_registered_pattern():
    text = README.read_text()
    for name, pattern in PATTERNS.items():
        assert f"| `{name}` | `{pattern.layer.__name__}` |" in text
