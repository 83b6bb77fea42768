"""bench/report.py's figures, drawn from synthetic results: shaper's line on top and unmistakable, a legend
on every panel, goal lines labelled, and no line joining points of different rule shapes."""

import random

import pytest

from bench import report

COUNTS = (1, 100, 1000, 10_000, 100_000)


def _summary(median: float, spread: float = 0.05) -> dict:
    return {"median": median, "min": median * (1 - spread), "max": median * (1 + spread), "n": 3,
            "samples": [median * (1 - spread), median, median * (1 + spread)]}


def classify_results() -> dict:
    rate = {"baseline": lambda n: 250_000, "shaper": lambda n: 215_000, "u32": lambda n: 230_000 / (1 + n / 900),
            "ipset": lambda n: 212_000, "iptables": lambda n: 220_000 / (1 + n / 90)}
    rows = [{"n": n, "mechanism": m, "traffic": t, "pps": _summary(f(n) * (1.0 if t == "match" else 1.02)),
             "checks": [], "setup_s": 0.1} for m, f in rate.items() for n in COUNTS for t in ("match", "miss")]
    return {"mechanisms": list(rate), "counts": list(COUNTS), "repeats": 3, "seconds": 1.0, "rows": rows}


def apply_results() -> dict:
    rows = []
    for n in (10, 100, 1000):
        rows.append({"n": n, "method": "shaper PUT /rules (bulk)", "seconds": _summary(n * 8e-5)})
        rows.append({"n": n, "method": "shaper PUT /rules/{name} x N", "seconds": _summary(n * 5e-3)})
        rows.append({"n": n, "method": "tcconfig tcset --add x N", "seconds": _summary(n * 1.2)})
    rows.append({"n": 100_000, "method": "shaper PUT /rules (bulk, 1000 rules x 100 prefixes)",
                 "seconds": _summary(2.0)})
    rows.append({"n": 100_000, "method": "shaper Controller.apply (1 rules x 100000 prefixes)",
                 "seconds": _summary(0.7)})
    return {"counts": [10, 100, 1000], "repeats": 3, "big": 100_000, "tcconfig": "0.29", "rows": rows}


def latency_results() -> dict:
    rnd = random.Random(7)
    return {"rows": [{"rules": n, "samples_ms": [rnd.lognormvariate(mu, 0.4) for _ in range(300)],
                      "keepalive_samples_ms": [rnd.lognormvariate(mu - 0.5, 0.4) for _ in range(300)]}
                     for n, mu in ((10, -0.4), (1000, 0.2), (10_000, 0.6))]}


@pytest.fixture
def drawn(monkeypatch):
    """The figures a plot function made (kept open instead of closed)."""
    figs = []
    monkeypatch.setattr(report.plt, "close", figs.append)
    return figs


def series(ax) -> dict:
    """label -> (the data line, its x values) for every error-bar series on an axes."""
    return {c.get_label(): (c.lines[0], list(c.lines[0].get_xdata())) for c in ax.containers}


def legend_texts(ax) -> list[str]:
    legend = ax.get_legend()
    assert legend is not None, f"no legend on the panel {ax.get_title()!r}"
    return [t.get_text() for t in legend.get_texts()]


def assert_shaper_on_top(ax, shaper_labels: set[str]) -> None:
    lines = series(ax)
    top = {label: line for label, (line, _) in lines.items() if label in shaper_labels}
    others = [line for label, (line, _) in lines.items() if label not in shaper_labels]
    assert top and others
    for line in top.values():
        assert line.get_zorder() > max(o.get_zorder() for o in others)
        assert line.get_linewidth() > max(o.get_linewidth() for o in others)
        assert line.get_color() not in {o.get_color() for o in others}
    # Drawn last too, so equal z-order elsewhere could not hide it either.
    assert list(lines)[-len(top):] == list(top)


def test_classify_figure(tmp_path, drawn):
    out = tmp_path / "classify.png"
    report.plot_classify(classify_results(), out)
    assert out.stat().st_size > 10_000
    (fig,) = drawn
    for ax in fig.axes:
        texts = legend_texts(ax)
        assert report.LABELS["shaper"] in texts and report.LABELS["u32"] in texts
        assert_shaper_on_top(ax, {report.LABELS["shaper"]})
    goals = [t for t in legend_texts(fig.axes[0]) if t.startswith("goal:")]
    assert len(goals) == 2, goals


def test_apply_figure_never_joins_different_rule_shapes(tmp_path, drawn):
    out = tmp_path / "apply.png"
    report.plot_apply(apply_results(), out)
    assert out.stat().st_size > 10_000
    (fig,) = drawn
    (ax,) = fig.axes
    lines = series(ax)
    assert lines["shaper PUT /rules (bulk)"][1] == [10, 100, 1000]
    big, xs = lines["shaper PUT /rules (bulk, 1000 rules x 100 prefixes)"]
    assert xs == [100_000] and big.get_linestyle() == "None"
    texts = legend_texts(ax)
    assert "goal: 100,000 prefixes in <= 1 s" in texts and "goal: 100x faster than tcconfig at 1,000" in texts
    assert_shaper_on_top(ax, {label for label in lines if label.startswith("shaper")})


def test_latency_figure_labels_its_goal_lines(tmp_path, drawn):
    out = tmp_path / "latency.png"
    report.plot_latency(latency_results(), out)
    assert out.stat().st_size > 10_000
    (fig,) = drawn
    texts = legend_texts(fig.axes[0])
    assert {"goal: p50 <= 2 ms (1,000 rules)", "goal: p99 <= 10 ms (1,000 rules)",
            "goal: p99 <= 20 ms (10,000 rules)", "shaper, 10 rules in place", "shaper, 1,000 rules in place",
            "shaper, 10,000 rules in place", "shaper, 10,000 rules, keep-alive"} <= set(texts)
