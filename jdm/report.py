"""The comparison table as people read it: `table.md` and a self-contained `index.html` (the table,
the papers' numbers beside ours, and per condition a grid: control maps, the teacher without
control, then each method's samples for the same maps and prompts)."""

from __future__ import annotations

import html
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

# SD 1.5 at 512 px, FID / consistency. NCT (arXiv 2506.19741, Table 1) re-implements JDM and the
# DI+ControlNet baseline beside 50-step ControlNet; the JDM paper (arXiv 2503.06652) gives its
# baselines' figures in the text for Canny and Depth only.
PAPER = {
    ("controlnet-50", "canny"): (14.48, 0.113, "NCT T1"), ("controlnet-50", "hed"): (19.21, 0.101, "NCT T1"),
    ("controlnet-50", "depth"): (15.25, 0.093, "NCT T1"), ("controlnet-50", "sr"): (11.93, 0.065, "NCT T1"),
    ("di-controlnet", "canny"): (22.74, 0.141, "NCT T1"), ("di-controlnet", "hed"): (28.04, 0.113, "NCT T1"),
    ("di-controlnet", "depth"): (22.49, 0.097, "NCT T1"), ("di-controlnet", "sr"): (15.57, 0.126, "NCT T1"),
    ("jdm", "canny"): (14.35, 0.122, "NCT T1"), ("jdm", "hed"): (16.75, 0.055, "NCT T1"),
    ("jdm", "depth"): (16.71, 0.093, "NCT T1"), ("jdm", "sr"): (13.23, 0.068, "NCT T1"),
    ("denoising", "canny"): (28.83, 0.109, "JDM Sec. 4.2"), ("denoising", "depth"): (35.14, 0.094, "JDM Sec. 4.2"),
    ("implicit", "canny"): (22.87, 0.151, "JDM Sec. 4.2"), ("implicit", "depth"): (22.34, 0.150, "JDM Sec. 4.2"),
}
LABELS = {"jdm": "JDM (one step)", "controlnet-50": "ControlNet (DM), multi-step + CFG",
          "di-controlnet": "DI + teacher's ControlNet", "denoising": "ControlNet via denoising (Eq. 11)",
          "implicit": "implicit ControlNet, plain VSD (Eq. 12)", "wo-warmup": "JDM w/o warm-up (DI generator)",
          "wo-modelling": "JDM w/o modelling log p(c|x_t)"}
COLUMNS = [("nfe", "NFE", "{:.0f}"), ("latency_ms", "latency ms/img", "{:.1f}"),
           ("fid_inception", "FID Inception", "{:.1f}"), ("fid_classifier", "FID classifier", "{:.3f}"),
           ("consistency", "consistency L1", "{:.4f}"), ("prompt_accuracy", "prompt acc.", "{:.2f}")]


def _cells(row: dict) -> list[str]:
    cells = [fmt.format(row[key]) if key in row else "-" for key, _, fmt in COLUMNS]
    paper = PAPER.get((row["method"], row["condition"]))
    cells.append(f"{paper[0]:.2f} / {paper[1]:.3f} ({paper[2]})" if paper else "-")
    return cells


HEADER = ["method", "condition"] + [title for _, title, _ in COLUMNS] + ["paper FID / consistency (SD 1.5)"]


def summary(rows: list[dict]) -> list[str]:
    """The headline comparisons, computed from the rows (JDM against each other method)."""
    by = {(r["method"], r["condition"]): r for r in rows}
    conditions = list(dict.fromkeys(r["condition"] for r in rows))
    lines = []
    for other in dict.fromkeys(r["method"] for r in rows):
        if other == "jdm":
            continue
        pairs = [(by[("jdm", c)], by[(other, c)]) for c in conditions if ("jdm", c) in by and (other, c) in by]
        if not pairs:
            continue
        better = sum(j["consistency"] < o["consistency"] for j, o in pairs)
        line = f"JDM vs {LABELS.get(other, other)}: consistency better on {better}/{len(pairs)} conditions"
        for feature in ("inception", "classifier"):
            key = f"fid_{feature}"
            if all(key in j and key in o for j, o in pairs):
                ratio = np.mean([j[key] for j, _ in pairs]) / np.mean([o[key] for _, o in pairs])
                line += f"; mean FID ({feature}) ratio JDM/{other} = {ratio:.2f}"
        line += f"; NFE {pairs[0][0]['nfe']:.0f} vs {pairs[0][1]['nfe']:.0f}"
        lines.append(line)
    return lines


def write_report(rows: list[dict], methods: list[str], conditions: list[str], pictures: dict[str, np.ndarray],
                 samples_dir: Path, out: Path, profile: str) -> None:
    counts = sorted({(r.get("num_samples"), r.get("num_reference")) for r in rows}, key=str)
    note = ("FID: controlled samples against the teacher's samples without control for the same prompts "
            "(the paper's definition); " + ", ".join(f"{n} samples vs {m} reference" for n, m in counts)
            + f". Profile `{profile}`. NFE counts sampler steps (CFG's two halves run as one batch).")
    headline = summary(rows)

    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join([LABELS.get(r["method"], r["method"]), r["condition"]] + _cells(r)) + " |" for r in rows]
    (out / "table.md").write_text("\n".join([f"# JDM comparison ({profile})", "", note, ""] + lines + [""]
                                            + [f"- {h}" for h in headline]) + "\n")

    for name, grid in pictures.items():
        Image.fromarray(grid).save(out / f"{name}.png")
    for method in methods:
        for c in conditions:
            shutil.copyfile(samples_dir / f"{method}-{c}.png", out / f"{method}-{c}.png")

    esc = html.escape
    table = ["<table id='results'><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in HEADER) + "</tr></thead><tbody>"]
    table += ["<tr>" + "".join(f"<td>{esc(x)}</td>" for x in [LABELS.get(r["method"], r["method"]), r["condition"]]
                               + _cells(r)) + "</tr>" for r in rows]
    table.append("</tbody></table>")
    grids = []
    for c in conditions:
        figure = [f"<h3>{esc(c)}</h3><table class='grid'>"]
        for label, src in ([("control map", f"maps-{c}.png"), ("teacher, no control", "teacher.png")]
                           + [(LABELS.get(m, m), f"{m}-{c}.png") for m in methods]):
            figure.append(f"<tr><th>{esc(label)}</th><td><img src='{esc(src)}' alt='{esc(label)} {esc(c)}'></td></tr>")
        figure.append("</table>")
        grids.append("".join(figure))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>JDM comparison ({esc(profile)})</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} #results td:nth-child(-n+2){{text-align:left}} .grid img{{image-rendering:pixelated;height:64px}}
.grid th{{text-align:left;font-weight:normal}}</style></head>
<body><h1>JDM: adding controls to a one-step generator ({esc(profile)})</h1>
<p>{esc(note)}</p>
{''.join(table)}
<ul>{''.join(f'<li>{esc(h)}</li>' for h in headline)}</ul>
<h2>Samples (same control maps and prompts in every row)</h2>
<p id="status">checking the page...</p>
{''.join(grids)}
<script>
// says on the page (and to a headless browser's DOM dump) whether every picture loaded
window.addEventListener("load", () => {{
  const images = Array.from(document.images);
  const loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  const rows = document.querySelectorAll("#results tbody tr").length;
  document.getElementById("status").textContent = `${{rows}} result rows, ${{loaded}} of ${{images.length}} images loaded`;
}});
</script>
</body></html>
"""
    (out / "index.html").write_text(page)
