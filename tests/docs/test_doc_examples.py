"""Every ``cellseg-deploy ...`` example in the docs and in every ``--help`` fits the live command tree.

Parsed with click's own parser for each command (no command runs): commands exist, options exist and get
their values, required options and arguments are given, choice / number values convert. When an option is
renamed or made required, the examples that no longer work are named here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cellseg_deploy.cli.main import cli
from tests.docs.cli_examples import Example, check_example, help_examples, markdown_examples

ROOT = Path(__file__).resolve().parents[2]
DOCS = [
    ROOT / "README.md",
    ROOT / "train" / "README.md",
    ROOT / "benchmarks" / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
]


def _doc_examples() -> list[Example]:
    return [e for path in DOCS if path.is_file() for e in markdown_examples(path, ROOT)]


def test_every_doc_example_fits_the_cli() -> None:
    examples = _doc_examples()
    assert len(examples) >= 40, f"only {len(examples)} examples found: is the extraction broken?"
    problems = [
        f"{e.where}: {e.text}\n    -> {p}"
        for e in examples
        for p in check_example(cli, e.text, inline=e.inline)
    ]
    assert not problems, "examples that do not fit the CLI:\n" + "\n".join(problems)


def test_every_help_example_fits_the_cli() -> None:
    examples = help_examples(cli)
    commands_with_examples = {e.where for e in examples}
    assert len(commands_with_examples) >= 8, commands_with_examples
    problems = [f"{e.where}: {e.text}\n    -> {p}" for e in examples for p in check_example(cli, e.text)]
    assert not problems, "help examples that do not fit the CLI:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cellseg-deploy parity ckpt.pt --candidate m.onnx --data d --no-such-option 3", "no-such-option"),
        ("cellseg-deploy parity ckpt.pt --candidate m.onnx", "data"),  # required option missing
        ("cellseg-deploy eval m.onnx --data d --split validation", "validation"),  # not a choice
        ("cellseg-deploy bench --iters many", "many"),  # not an integer
        ("cellseg-deploy benchmark --engine torch", "benchmark"),  # no such command
        ("cellseg-deploy data to-coco ROOT --out a.json extra", "extra"),  # extra argument
        ("cellseg-deploy train --data d --recipe tiny_cpu", "out"),  # the cpu-fast-path.md mistake
        # deprecated spellings still run, but the docs must teach the new ones
        (
            "cellseg-deploy parity ckpt.pt --candidate m.onnx --data d --images 3",
            "Deprecated spelling of --limit",
        ),
        ("cellseg-deploy parity ckpt.pt --candidate m.onnx --data d --profile fp16", "--precision"),
        ("cellseg-deploy bench --untrained tiny --images 4", "--synthetic-images"),
    ],
)
def test_a_made_up_example_that_does_not_fit_is_caught(text: str, expected: str) -> None:
    problems = check_example(cli, text)
    assert problems and expected in " ".join(problems), problems


def test_made_up_doc_with_a_wrong_option_fails(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "Run `cellseg-deploy demo --out runs/demo`, then:\n\n```bash\n$ cellseg-deploy bench --engine torch \\\n"
        "    --model ckpt.pt --warmups 2 | tee log\n```\nand `cellseg-deploy bench --untrained` alone.\n"
    )
    examples = markdown_examples(doc, tmp_path)
    assert [e.where for e in examples] == ["doc.md:1", "doc.md:4", "doc.md:7"]
    verdicts = [check_example(cli, e.text, inline=e.inline) for e in examples]
    assert verdicts[0] == [] and verdicts[2] == []
    assert "--warmups" in " ".join(verdicts[1])


def test_synopsis_notation_is_read_not_flagged() -> None:
    assert check_example(cli, "cellseg-deploy eval MODEL --data ROOT --split val|test [--max-dets N]") == []
    assert check_example(cli, "cellseg-deploy eval MODEL --data ROOT --split val|test [--max-detz N]")


def test_env_prefixes_chains_and_wrapped_spans_are_found(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "```bash\npip install -e . && .venv/bin/cellseg-deploy demo --outt runs/demo\n```\n\n"
        "Made by `OMP_NUM_THREADS=2 cellseg-deploy bench --untrained tiny\n--itres 3` on a quiet machine.\n"
    )
    examples = markdown_examples(doc, tmp_path)
    assert [(e.where, e.text) for e in examples] == [
        ("doc.md:2", "cellseg-deploy demo --outt runs/demo"),
        ("doc.md:5", "cellseg-deploy bench --untrained tiny --itres 3"),
    ]
    assert all(check_example(cli, e.text, inline=e.inline) for e in examples)  # --outt, --itres
