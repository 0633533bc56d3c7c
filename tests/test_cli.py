"""The `contextwise` command: report (tables, JSON, plot), policy, models, demo, chat."""

from __future__ import annotations

import json

import pytest
from contextwise.memory.ledger import CallRecord, Ledger
from contextwise.memory.store import Store

from contextwise.cli import main


def _record(ledger: Ledger, raw: int, seen: int) -> None:
    ledger.add(CallRecord(
        session="s", model="m", prompt_tokens=seen, completion_tokens=10, raw_prompt_tokens=raw,
        cl100k_prompt=seen, cl100k_raw_prompt=raw, cl100k_completion=10, latency_s=0.5,
        finish_reason="stop",
        trace=[{"stage": "prune", "data": {"tokens_before": raw, "tokens_after": seen}}],
    ))


def test_report_json_and_plot(tmp_path, capsys):
    db = tmp_path / "cw.db"
    ledger = Ledger(Store(db))
    _record(ledger, 1000, 200)
    _record(ledger, 600, 300)
    png = tmp_path / "out.png"
    assert main(["report", "--db", str(db), "--json", "--plot", str(png)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["calls"] == 2
    assert summary["prompt_tokens_saved"] == 1100
    assert summary["per_stage"]["prune"]["tokens_saved"] == 1100
    cost = summary["estimated_cost"]["gpt-4o"]
    assert cost["passthrough_usd"] == pytest.approx((1600 * 2.5 + 20 * 10) / 1e6)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_tables_and_empty_ledger(tmp_path, capsys):
    db = tmp_path / "cw.db"
    assert main(["report", "--db", str(db)]) == 0
    assert "No calls recorded" in capsys.readouterr().out
    _record(Ledger(Store(db)), 500, 100)
    assert main(["report", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "prompt tokens saved" in out and "400" in out and "gpt-4o-mini" in out


def test_policy_command_and_bad_policy_file(tmp_path, capsys):
    good = tmp_path / "p.py"
    good.write_text("from contextwise import Policy\nfrom contextwise.policy import Budget\n"
                    "policy = Policy(budget=Budget(max_output_tokens=99))\n")
    assert main(["policy", "--policy", str(good)]) == 0
    assert "max_output_tokens: 99  *" in capsys.readouterr().out
    bad = tmp_path / "bad.py"
    bad.write_text("from contextwise import Policy\npolicy = Policy(budgett=1)\n")
    assert main(["policy", "--policy", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "budgett" in err and "unknown key" in err and "Traceback" not in err


def test_models_list(capsys):
    assert main(["models", "list"]) == 0
    assert "smollm2-135m-instruct\tinstalled" in capsys.readouterr().out


@pytest.mark.model
def test_demo_runs_one_turn(capsys):
    assert main(["demo", "--turns", "1"]) == 0
    out = capsys.readouterr().out
    assert "get_weather" in out and "demo summary" in out
    # the encore: a second user's same question is an exact hit, the reworded one semantic
    encore = out[out.index("response cache"):]
    assert "exact" in encore and "semantic" in encore


@pytest.mark.model
def test_demo_tool_calls_are_valid_and_run():
    import io

    from rich.console import Console

    from contextwise.demo import TOOLS, run_demo

    steps = run_demo(console=Console(file=io.StringIO()), turns=2)
    calls = [s.reply for s in steps if s.kind == "tool call"]
    assert [r.tool_calls[0].name for r in calls] == ["get_weather", "search_flights"]
    for r in calls:
        tool = next(t for t in TOOLS if t.name == r.tool_calls[0].name)
        assert tool.argument_errors(r.tool_calls[0].arguments) == []
        assert r.invalid_tool_calls == []


@pytest.mark.model
def test_chat_repl_streams_a_reply(monkeypatch, capsys):
    lines = iter(["Say hi.", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "bot> " in out and "prompt +" in out
