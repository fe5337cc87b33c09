"""`vlchat bench`'s report (vlchat/bench/decode.py): the best of several runs and the printed table.
The measurement itself runs the default model in child processes; tests/test_cli.py checks the command."""

from __future__ import annotations

from vlchat.bench.decode import KEYS, best_of, table


def figures(scale: float) -> dict:
    return {
        "image_encode_ms": 10 * scale,
        "ttft_first_s": scale,
        "ttft_followup_s": scale / 2,
        "decode_tok_s": 20 * scale,
        "peak_rss_mb": 900 * scale,
    }


def test_best_of_keeps_the_fastest_decode_and_the_lowest_of_everything_else():
    best = best_of([figures(1.0), figures(2.0)])
    assert set(best) == set(KEYS)
    assert best["decode_tok_s"] == 40.0  # higher is better
    assert best["ttft_first_s"] == 1.0 and best["peak_rss_mb"] == 900.0  # lower is better


def test_table_gives_each_figure_beside_the_baseline_and_their_ratio():
    report = {**figures(1.0), "baseline": figures(2.0), "tokens_per_turn": 64, "rounds": 2}
    lines = table(report).splitlines()
    decode = next(line for line in lines if line.startswith("decode (tokens/s)"))
    assert decode.split()[-3:] == ["20.0", "40.0", "0.50"]
    assert "64 tokens per turn" in lines[-1] and "best of 2 runs" in lines[-1]


def test_a_zero_baseline_gives_nan_not_a_division_error():
    report = {**figures(1.0), "baseline": {**figures(1.0), "image_encode_ms": 0.0}, "tokens_per_turn": 8, "rounds": 1}
    encode = next(line for line in table(report).splitlines() if line.startswith("image encode"))
    assert encode.split()[-1] == "nan"
