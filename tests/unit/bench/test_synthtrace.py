"""The synthetic Mooncake-format traces: deterministic, in the format ``--trace`` reads, and
close to the published statistics of the kind they imitate."""

from __future__ import annotations

from pathlib import Path

import pytest
from kvroute_bench import synthtrace
from kvroute_bench.traces import MOONCAKE_BLOCK_TOKENS, TraceOptions, load


def test_same_seed_same_rows_other_seed_other_rows() -> None:
    a = synthtrace.mooncake_like("toolagent", 200, 2.0, seed=3)
    assert a == synthtrace.mooncake_like("toolagent", 200, 2.0, seed=3)
    assert a != synthtrace.mooncake_like("toolagent", 200, 2.0, seed=4)


@pytest.mark.parametrize("kind", sorted(synthtrace.KINDS))
def test_rows_are_well_formed_mooncake(kind: str) -> None:
    rows = synthtrace.mooncake_like(kind, 300, 5.0, seed=0)
    stamps = [r["timestamp"] for r in rows]
    assert stamps == sorted(stamps)
    for r in rows:
        assert set(r) == {"timestamp", "input_length", "output_length", "hash_ids"}
        # One id per 512-token block, the last one partly filled.
        assert len(r["hash_ids"]) == -(-r["input_length"] // MOONCAKE_BLOCK_TOKENS)
        assert r["input_length"] <= synthtrace.KINDS[kind].max_input
        assert r["output_length"] >= 1
    assert synthtrace.stats(rows).rate == pytest.approx(5.0, rel=0.2)


@pytest.mark.parametrize("kind", sorted(synthtrace.KINDS))
def test_statistics_follow_the_published_description(kind: str) -> None:
    spec = synthtrace.KINDS[kind]
    for seed in range(3):
        got = synthtrace.stats(synthtrace.mooncake_like(kind, 2000, 1.0, seed))
        assert got.mean_input == pytest.approx(spec.target_input, rel=0.15)
        assert got.mean_output == pytest.approx(spec.target_output, rel=0.15)
        assert got.block_reuse == pytest.approx(spec.target_reuse, abs=0.07)


def test_shared_prefixes_are_shared_leading_ids() -> None:
    rows = synthtrace.mooncake_like("toolagent", 400, 1.0, seed=0)
    earlier: set[tuple[int, ...]] = set()
    continued = 0
    for r in rows:
        ids = tuple(r["hash_ids"])
        if any(ids[:k] in earlier for k in range(len(ids) - 1, 0, -1)):
            continued += 1
        earlier.update(ids[:k] for k in range(1, len(ids) + 1))
        # Ids are reused only as a prefix: no id appears twice in one prompt.
        assert len(set(ids)) == len(ids)
    assert continued > len(rows) // 2


def test_the_trace_loader_replays_a_generated_file(tmp_path: Path) -> None:
    path = tmp_path / "toolagent.jsonl"
    rows = synthtrace.mooncake_like("toolagent", 50, 10.0, seed=1)
    synthtrace.write(rows, path)
    trace = load(TraceOptions(path, max_context=32768))
    assert len(trace.requests) == 50 and trace.params["format"] == "mooncake"
    assert [r.max_tokens for r in trace.requests] == [r["output_length"] for r in rows]
    assert [r.prompt_tokens for r in trace.requests] == [r["input_length"] for r in rows]
    assert trace.requests[-1].arrival_s == pytest.approx(
        (rows[-1]["timestamp"] - rows[0]["timestamp"]) / 1000)


def test_main_writes_the_file_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    out = tmp_path / "t.jsonl"
    assert synthtrace.main(["--kind", "conversation", "--requests", "20", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 20
    assert "target" in capsys.readouterr().out


def test_the_shipped_tiny_trace_is_the_generator_output(tmp_path: Path) -> None:
    shipped = Path(__file__).resolve().parents[3] / "bench" / "traces" / (
        "mooncake-toolagent-synth-tiny.jsonl")
    synthtrace.write(synthtrace.mooncake_like("toolagent", 30, 1.0, seed=0),
                     tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_text() == shipped.read_text()
