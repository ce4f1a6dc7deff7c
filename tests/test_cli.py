"""The lemoe command: exit codes, one-line errors, and a real edit/eval/generate on a tiny model."""

import json

import pytest

from lemoe_engine.cli import main
from lemoe_engine.data import save_edits
from test_editor import tiny_edits
from tiny_models import tiny_model, tiny_tokenizer


def save_tiny(folder, hidden=64, seed=0):
    tok = tiny_tokenizer(False)
    model = tiny_model("llama", seed=seed, vocab=len(tok), layers=6, hidden=hidden)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    edits = root / "edits.jsonl"
    save_edits(tiny_edits(4, seed=5), edits)
    return {"root": root, "model": save_tiny(root / "model"), "edits": str(edits)}


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_edit_eval_generate_round_trip(workspace, capsys):
    adaptor = str(workspace["root"] / "adaptor")
    code, out, err = run(capsys, "edit", "--model", workspace["model"], "--edits", workspace["edits"],
                         "--out", adaptor, "--layer", "4", "--plan", "kmeans", "--batch-size", "2",
                         "--expert-hidden", "32", "--no-train-eos", "--expert-span", "prompt", "--query-window", "2")
    assert code == 0, err
    assert json.loads((workspace["root"] / "adaptor" / "adaptor.json").read_text())["config"]["expert_span"] == "prompt"
    assert json.loads((workspace["root"] / "adaptor" / "adaptor.json").read_text())["config"]["query_window"] == 2
    assert "2 new experts" in out and "adaptor written" in out
    code, out, err = run(capsys, "eval", "--model", workspace["model"], "--adaptor", adaptor,
                         "--edits", workspace["edits"], "--json")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert set(result) == {"reliability", "generality", "locality", "n_edits", "specificity", "n_specificity",
                           "leak_rate", "mode", "chat"} and result["n_edits"] == 4
    assert 0 <= result["reliability"] <= 1 and result["locality"] <= 1
    code, out, err = run(capsys, "generate", "--model", workspace["model"], "--adaptor", adaptor,
                         "--prompt", "What is the capital city of France?", "--max-new-tokens", "3")
    assert code == 0 and out.strip(), err
    # continue editing the saved adaptor with more edits
    more = workspace["root"] / "more.jsonl"
    save_edits(tiny_edits(2, seed=9), more)
    code, out, err = run(capsys, "edit", "--model", workspace["model"], "--edits", str(more), "--out",
                         adaptor, "--adaptor", adaptor, "--plan", "none", "--batch-size", "2", "--expert-hidden", "32")
    assert code == 2 and "--expert-hidden" in err  # cannot change an existing adaptor's shape
    code, out, err = run(capsys, "edit", "--model", workspace["model"], "--edits", str(more), "--out",
                         adaptor, "--adaptor", adaptor, "--plan", "none", "--batch-size", "2")
    assert code == 0 and "(3 in total)" in out, err
    # --batch-size belongs to the batched plans: with the default plan it is a one-line error
    line = one_line_error(*run(capsys, "edit", "--model", workspace["model"], "--edits", str(more), "--out",
                               str(workspace["root"] / "other"), "--batch-size", "2")[::2])
    assert "plan='keys'" in line


def one_line_error(code, err):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "error:" in err.strip().splitlines()[-1] and "Traceback" not in err
    return lines[0]


def test_missing_and_malformed_edit_files(workspace, capsys, tmp_path):
    out = str(tmp_path / "a")
    line = one_line_error(*run(capsys, "edit", "--model", workspace["model"], "--edits",
                               str(tmp_path / "nope.jsonl"), "--out", out)[::2])
    assert "nope.jsonl" in line
    bad = tmp_path / "bad.json"
    bad.write_text('[{"src": "a", "alt": ')
    assert "bad.json" in one_line_error(*run(capsys, "eval", "--model", workspace["model"], "--adaptor",
                                             out, "--edits", str(bad))[::2])


def test_missing_and_incompatible_adaptors(workspace, capsys, tmp_path):
    line = one_line_error(*run(capsys, "eval", "--model", workspace["model"], "--adaptor",
                               str(tmp_path / "none"), "--edits", workspace["edits"])[::2])
    assert "does not exist" in line
    adaptor = str(tmp_path / "adaptor")
    assert run(capsys, "edit", "--model", workspace["model"], "--edits", workspace["edits"], "--out", adaptor,
               "--layer", "4", "--limit", "1", "--expert-hidden", "16")[0] == 0
    other = save_tiny(tmp_path / "wider", hidden=96)
    line = one_line_error(*run(capsys, "generate", "--model", other, "--adaptor", adaptor,
                               "--prompt", "hi")[::2])
    assert "hidden_size=64" in line and "hidden_size=96" in line


def test_bad_arguments_and_unknown_model(workspace, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(["edit", "--model", workspace["model"], "--edits", workspace["edits"], "--out",
              str(tmp_path / "a"), "--limit", "0"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2
    capsys.readouterr()
    line = one_line_error(*run(capsys, "generate", "--model", str(tmp_path / "missing-model"),
                               "--prompt", "hi")[::2])
    assert "smollm2-135m" in line


def test_no_train_eos_flag_reaches_the_editor_config():
    from lemoe_engine.cli import _editor_config, build_parser
    base = ["edit", "--model", "m", "--edits", "e.jsonl", "--out", "o"]
    assert _editor_config(build_parser().parse_args(base))[1].train_eos is True
    assert _editor_config(build_parser().parse_args(base + ["--no-train-eos"]))[1].train_eos is False


def test_train_dtype_flag_reaches_the_editor_config():
    from lemoe_engine.cli import _editor_config, build_parser
    base = ["edit", "--model", "m", "--edits", "e.jsonl", "--out", "o"]
    assert _editor_config(build_parser().parse_args(base))[1].train_dtype == "auto"
    assert _editor_config(build_parser().parse_args(base + ["--train-dtype", "model"]))[1].train_dtype is None
    assert _editor_config(build_parser().parse_args(base + ["--train-dtype", "bfloat16"]))[1].train_dtype == "bfloat16"


def test_question_gate_flags_reach_the_config_and_the_saved_adaptor(workspace, capsys):
    """--question-gate COSINE / --no-question-gate: the new adaptor's config (saved), the default
    otherwise; on `edit --adaptor` they change the saved adaptor's gate."""
    from lemoe_engine.cli import _editor_config, build_parser
    from lemoe_engine.config import DEFAULT_QUESTION_GATE
    base = ["edit", "--model", "m", "--edits", "e.jsonl", "--out", "o"]
    gate = lambda *extra: _editor_config(build_parser().parse_args(base + list(extra)))[0].question_gate
    assert gate() == DEFAULT_QUESTION_GATE and gate("--question-gate", "0.6") == 0.6
    assert gate("--question-gate") == DEFAULT_QUESTION_GATE and gate("--no-question-gate") is None
    with pytest.raises(SystemExit):  # one or the other
        build_parser().parse_args(base + ["--question-gate", "--no-question-gate"])

    adaptor = workspace["root"] / "gated"
    saved = lambda: json.loads((adaptor / "adaptor.json").read_text())["config"]["question_gate"]
    code, out, err = run(capsys, "edit", "--model", workspace["model"], "--edits", workspace["edits"],
                         "--out", str(adaptor), "--layer", "4", "--expert-hidden", "16", "--no-question-gate")
    assert code == 0 and saved() is None, err
    more = workspace["root"] / "more_gated.jsonl"
    save_edits(tiny_edits(1, seed=11), more)
    code, out, err = run(capsys, "edit", "--model", workspace["model"], "--edits", str(more), "--out",
                         str(adaptor), "--adaptor", str(adaptor), "--question-gate", "0.8")
    assert code == 0 and saved() == 0.8, err
    for flag in (["--no-question-gate"], ["--question-gate", "0.5"], []):
        code, out, err = run(capsys, "generate", "--model", workspace["model"], "--adaptor", str(adaptor),
                             "--prompt", "What is the capital city of France?", "--max-new-tokens", "2", *flag)
        assert code == 0, err
    assert saved() == 0.8  # serving-time choices leave the saved adaptor alone
    line = one_line_error(*run(capsys, "generate", "--model", workspace["model"], "--adaptor", str(adaptor),
                               "--prompt", "Hi", "--question-gate", "1.5")[::2])
    assert "cosine in [-1, 1]" in line
