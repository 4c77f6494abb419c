"""The load generator's pictures (matplotlib, headless): the ISL x OSL 2-D histogram that sizes a deployment,
and the CDFs of TTFT, ITL and E2E."""
from __future__ import annotations

from pathlib import Path

from benchmarks.serve_stats import RequestRecord


def write_plots(records: list[RequestRecord], out_dir: Path, title: str) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.ok]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "isl_osl_hist.png", out_dir / "latency_cdf.png"]

    fig, ax = plt.subplots(figsize=(6, 5))
    counts, _, _, image = ax.hist2d([r.prompt_tokens for r in ok], [r.output_tokens for r in ok],
                                    bins=min(30, max(2, round(len(ok) ** 0.5))), cmap="viridis", cmin=1)
    fig.colorbar(image, ax=ax, label="requests")
    ax.set(xlabel="input sequence length (tokens)", ylabel="output sequence length (tokens)",
           title=f"ISL x OSL: {title}")
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    series = {"TTFT": [r.ttft for r in ok], "ITL": [x for r in ok for x in r.itls()], "E2E": [r.e2e for r in ok]}
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (name, values) in zip(axes, series.items()):
        values = sorted(v * 1e3 for v in values)
        ax.plot(values, [(i + 1) / len(values) for i in range(len(values))] if values else [], drawstyle="steps-post")
        ax.set(xlabel=f"{name} (ms)", ylabel="fraction of samples", title=f"{name} CDF", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths
