"""Names from files print as what they are: control characters escaped, markup and emoji codes literal."""

from __future__ import annotations

import pytest

from shadowgraft import display
from shadowgraft.synthetic import Shape, llama_tensors, make_trio

from .conftest import run_cli

# ESC[2J clears the screen, NUL and \r garble the line, \x9b is the C1 form of
# ESC[, [bold] is rich markup, :smile: an emoji code, \u202e flips the text.
EVIL = "q\x1b[2J\x00\r[bold]:smile:\x9b\x7f\u202e"
SHOWN = r"q\x1b[2J\x00\r[bold]:smile:\x9b\x7f\u202e"
NAME = f"model.layers.0.self_attn.{EVIL}.weight"
NAME_SHOWN = f"model.layers.0.self_attn.{SHOWN}.weight"
SHAPE = Shape(layers=2, hidden=64, intermediate=96, vocab=128)


def assert_literal(text: str, want: str = NAME_SHOWN) -> None:
    assert want in text, text
    for raw in ("\x1b", "\x00", "\r", "\x9b", "\x7f", "\u202e", "\U0001f604"):  # the last: the smile emoji
        assert raw not in text, repr(raw)


@pytest.fixture
def evil_trio(tmp_path):
    names = [(NAME if n == "model.layers.0.self_attn.q_proj.weight" else n, s) for n, s in llama_tensors(SHAPE)]
    return make_trio(tmp_path / "evil", names=names)


@pytest.fixture(autouse=True)
def wide(monkeypatch):
    # Wide enough that no table folds a name across lines.
    for con in (display.out, display.err):
        monkeypatch.setattr(con, "width", 400)


def test_shown_escapes_controls_and_markup():
    assert display.shown("a\x1b[2J\nb\tc\x00") == r"a\x1b[2J\nb\tc\x00"
    assert display.shown("[bold]x[/bold] :smile: é ü") == r"\[bold]x\[/bold] :smile: é ü"
    assert display.shown("\x85\u2028\x7f") == r"\x85\u2028\x7f"
    # What rich prints from it is the text as typed, escapes visible.
    from rich.console import Console

    con = Console(emoji=False, width=200, file=None, force_terminal=False, record=True)
    with con.capture() as cap:
        con.print(display.shown(EVIL))
    assert cap.get().rstrip("\n") == SHOWN
    with con.capture() as cap:
        con.print(display.cell(EVIL))
    assert cap.get().rstrip("\n") == SHOWN


def test_error_line_is_one_line_with_escapes(capsys):
    display.print_error(f"'{NAME}\nsecond': bad")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert_literal(err, f"'{NAME_SHOWN}\\nsecond': bad")


def test_dry_run_table(evil_trio, tmp_path, capsys):
    t = evil_trio
    code, out, err = run_cli(capsys, "apply", "--instruct", t["instruct"], "--base", t["base"], "--tuned", t["tuned"],
                             "-o", tmp_path / "o", "--dry-run")
    assert code == 0, err
    assert_literal(out)
    assert "14 graft" in out


def test_stats_tables(evil_trio, capsys):
    code, out, err = run_cli(capsys, "stats", evil_trio["base"], evil_trio["instruct"], "--by", "tensor", "--top", "0")
    assert code == 0, err
    assert_literal(out)


def test_stats_only_in_line(evil_trio, tmp_path, capsys):
    plain = make_trio(tmp_path / "plain", shape=SHAPE)
    code, out, err = run_cli(capsys, "stats", evil_trio["base"], plain["instruct"], "--top", "0")
    assert code == 0, err
    assert_literal(out)
    assert "only in A (1): " + NAME_SHOWN in out


def test_diff_rank_table(evil_trio, tmp_path, capsys):
    code, out, err = run_cli(capsys, "diff", evil_trio["base"], evil_trio["tuned"], "-o", tmp_path / "lora", "--rank", "2")
    assert code == 0, err
    assert_literal(out)


def test_error_line_names_the_tensor_escaped(evil_trio, tmp_path, capsys):
    plain = make_trio(tmp_path / "plain", shape=SHAPE)
    code, _, err = run_cli(capsys, "apply", "--instruct", evil_trio["instruct"], "--base", plain["base"],
                           "--tuned", evil_trio["tuned"], "-o", tmp_path / "o")
    assert code == 1
    assert len([ln for ln in err.splitlines() if ln.strip()]) == 1 and err.startswith("error: ")
    assert_literal(err)
    assert "missing from base" in err
