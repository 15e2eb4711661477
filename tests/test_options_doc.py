"""docs/training.md's options tables are generated from the dataclasses, and every option is documented."""
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from distseg.stages.options_doc import BEGIN, END, documented_classes, field_docs, generate, options_table

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"


@dataclass
class _Example:
    """Not a field doc."""

    size: int = 3
    """Side of the   thing,
    in pixels."""
    names: tuple[str, ...] = ("a", "b")
    plain: float | None = None
    """A | pipe."""
    inner: list[int] = field(default_factory=list)


def test_field_docs_are_the_string_under_each_field():
    assert field_docs(_Example) == {"size": "Side of the thing, in pixels.", "names": "", "plain": "A | pipe.",
                                    "inner": ""}


def test_a_table_row_per_field_with_type_default_and_escaped_doc():
    rows = options_table(_Example, "example").splitlines()
    assert rows[0] == "**`example`** (_Example)"
    assert rows[4] == "| `size` | int | `3` | Side of the thing, in pixels. |"
    assert rows[5] == "| `names` | tuple[str, ...] | `['a', 'b']` |  |"
    assert rows[6] == "| `plain` | float or None | `null` | A \\| pipe. |"
    assert rows[7] == "| `inner` | list[int] | `[]` |  |"


def test_every_stage_option_is_documented_where_it_is_declared():
    missing = [f"{section}.{f.name}" for section, cls in documented_classes() for f in dataclasses.fields(cls)
               if f.init and not field_docs(cls).get(f.name)]
    assert not missing, f"options without a docstring under their declaration: {missing}"


def test_the_options_tables_in_the_docs_match_the_code():
    text = DOC.read_text()
    assert BEGIN in text and END in text
    block = BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END + "\n"
    assert block == generate(), "docs/training.md is stale: run `python -m distseg.stages.options_doc docs/training.md`"
    sections = [section for section, _ in documented_classes()]
    assert {"train", "ssl", "ssl.ema", "ddpm.ema", "distill", "data.stream.augment"} <= set(sections)
