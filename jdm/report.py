"""The comparison table as people read it: `table.md` and a self-contained `index.html` (the table,
the papers' numbers beside ours, and per condition a grid: control maps, the teacher without
control, then each method's samples for the same maps and prompts)."""

from __future__ import annotations

import html
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .conditions import condition_slug
from .variants import LABELS, TEXT_LABELS

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
# (key, title, format, scale): a key with `_low` and `_high` beside it shows its 95% interval, "12.3 [10.1, 14.8]"
COLUMNS = [("nfe", "NFE", "{:.0f}", 1), ("latency_ms", "latency ms/img", "{:.1f}", 1),
           ("fid_inception", "FID Inception", "{:.1f}", 1), ("kid_inception", "KID Inception x1e3", "{:.1f}", 1e3),
           ("fid_classifier", "FID classifier", "{:.3f}", 1), ("kid_classifier", "KID classifier x1e3", "{:.2f}", 1e3),
           ("consistency", "consistency L1", "{:.4f}", 1),
           ("consistency_judge", "consistency, held-out judge", "{:.4f}", 1),
           ("prompt_accuracy", "prompt acc.", "{:.2f}", 1)]
# lower is better; the headline compares JDM with each method on these
COMPARED = [("consistency", "consistency"), ("consistency_judge", "consistency (held-out judge)"),
            ("fid_inception", "FID (inception)"), ("kid_inception", "KID (inception)"),
            ("fid_classifier", "FID (classifier)"), ("kid_classifier", "KID (classifier)")]


def _cell(row: dict, key: str, fmt: str, scale: float = 1) -> str:
    """The value, with its interval where the row has one; "-" where the row lacks the key (older metrics files)."""
    if key not in row:
        return "-"
    text = fmt.format(row[key] * scale)
    if f"{key}_low" in row and f"{key}_high" in row:
        text += f" [{fmt.format(row[f'{key}_low'] * scale)}, {fmt.format(row[f'{key}_high'] * scale)}]"
    return text


def _cells(row: dict) -> list[str]:
    cells = [_cell(row, key, fmt, scale) for key, _, fmt, scale in COLUMNS]
    paper = PAPER.get((row["method"], row["condition"]))
    cells.append(f"{paper[0]:.2f} / {paper[1]:.3f} ({paper[2]})" if paper else "-")
    return cells


HEADER = ["method", "condition"] + [title for _, title, _, _ in COLUMNS] + ["paper FID / consistency (SD 1.5)"]


def _order(a: dict, b: dict, key: str) -> int | None:
    """-1 where a's 95% interval of `key` lies wholly below b's, 1 wholly above, 0 where they overlap;
    None where either row lacks one (older metrics files)."""
    if not all(f"{key}_{end}" in r for r in (a, b) for end in ("low", "high")):
        return None
    if a[f"{key}_high"] < b[f"{key}_low"]:
        return -1
    return 1 if b[f"{key}_high"] < a[f"{key}_low"] else 0


def _separation(pairs: list[tuple[dict, dict]], key: str) -> str:
    """How many (JDM, other) pairs have disjoint 95% intervals, and in whose favour; "" unless every row has them."""
    orders = [_order(j, o, key) for j, o in pairs]
    if None in orders:
        return ""
    better, worse = orders.count(-1), orders.count(1)
    return f" (intervals disjoint on {better + worse}/{len(pairs)}: {better} better, {worse} worse)"


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
        clauses = []
        for key, name in COMPARED:
            scored = [(j, o) for j, o in pairs if key in j and key in o]  # the judge scores hed and depth only
            if not scored:
                continue
            better = sum(j[key] < o[key] for j, o in scored)
            clause = f"{name} better on {better}/{len(scored)} conditions{_separation(scored, key)}"
            if key.startswith("fid_"):
                ratio = np.mean([j[key] for j, _ in scored]) / np.mean([o[key] for _, o in scored])
                clause += f", mean ratio JDM/{other} = {ratio:.2f}"
            clauses.append(clause)
        if all("prompt_accuracy" in j and "prompt_accuracy" in o for j, o in pairs):  # higher is better
            gap = np.mean([j["prompt_accuracy"] - o["prompt_accuracy"] for j, o in pairs])
            clauses.append(f"prompt accuracy JDM - {other} = {100 * gap:+.1f} points (mean)")
        clauses.append(f"NFE {pairs[0][0]['nfe']:.0f} vs {pairs[0][1]['nfe']:.0f}")
        line = f"JDM vs {LABELS.get(other, other)}: " + "; ".join(clauses)
        lines.append(line)
    return lines


def _sample_link(samples_dir: Path, out: Path, name: str) -> str:
    """A page's link to a sample grid where the evaluate stage wrote it, so the repository holds one copy
    of each picture (`out` may be the temporary folder beside the page's final place: same parent, same link)."""
    if not (samples_dir / name).is_file():
        raise FileNotFoundError(f"{samples_dir / name} is missing: run the evaluate stage that writes it")
    return Path(os.path.relpath((samples_dir / name).resolve(), out.resolve())).as_posix()


def write_report(rows: list[dict], methods: list[str], conditions: list[str], pictures: dict[str, np.ndarray],
                 samples_dir: Path, out: Path, profile: str) -> None:
    counts = sorted({(r.get("num_samples"), r.get("num_reference")) for r in rows}, key=str)
    note = ("FID and KID (clean-fid's): controlled samples against the teacher's samples without control for "
            "the same prompts (the paper's definition); " + ", ".join(f"{n} samples vs {m} reference" for n, m in counts)
            + f". {_intervals_note(rows)} Profile `{profile}`. NFE counts sampler steps (CFG's two halves run as one batch).")
    headline = summary(rows)

    cells = [[LABELS.get(r["method"], r["method"]), r["condition"]] + _cells(r) for r in rows]
    lines = _markdown_table(HEADER, cells)
    (out / "table.md").write_text("\n".join([f"# JDM comparison ({profile})", "", note, ""] + lines + [""]
                                            + [f"- {h}" for h in headline]) + "\n")

    for name, grid in pictures.items():
        Image.fromarray(grid).save(out / f"{name}.png")

    esc = html.escape
    table = _html_table(HEADER, cells)
    grids = []
    rowed = {(r["method"], condition_slug(r["condition"])) for r in rows}  # a method may lack a condition's row
    for c in conditions:
        figure = [f"<h3>{esc(c)}</h3><table class='grid'>"]
        for label, src in ([("control map", f"maps-{c}.png"), ("teacher, no control", "teacher.png")]
                           + [(LABELS.get(m, m), _sample_link(samples_dir, out, f"{m}-{c}.png"))
                              for m in methods if (m, c) in rowed]):
            figure.append(f"<tr><th>{esc(label)}</th><td><img src='{esc(src)}' alt='{esc(label)} {esc(c)}'></td></tr>")
        figure.append("</table>")
        grids.append("".join(figure))
    (out / "index.html").write_text(_page(f"JDM comparison ({profile})",
                                          f"JDM: adding controls to a one-step generator ({profile})", note, table,
                                          headline, "Samples (same control maps and prompts in every row)", grids))


def _intervals_note(rows: list[dict]) -> str:
    resamples = sorted({r["bootstrap_resamples"] for r in rows if r.get("bootstrap_resamples")})
    if not resamples:
        return "No intervals."
    return (f"[low, high]: 95% bootstrap interval ({' / '.join(map(str, resamples))} resamples of each row's samples, "
            "the reference fixed); KID x1e3.")


def _markdown_table(header: list[str], cells: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(c) + " |" for c in cells]


def _html_table(header: list[str], cells: list[list[str]]) -> list[str]:
    esc = html.escape
    return (["<table id='results'><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead><tbody>"]
            + ["<tr>" + "".join(f"<td>{esc(x)}</td>" for x in c) + "</tr>" for c in cells] + ["</tbody></table>"])


def _page(title: str, heading: str, note: str, table: list[str], headline: list[str], samples_heading: str,
          grids: list[str]) -> str:
    """A self-contained page: the table, the headline comparisons, the sample grids, and a line that
    says whether every picture loaded."""
    esc = html.escape
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}} #results td:nth-child(-n+2){{text-align:left}}
.grid img{{image-rendering:pixelated;height:64px}}
.grid th{{text-align:left;font-weight:normal}}</style></head>
<body><h1>{esc(heading)}</h1>
<p>{esc(note)}</p>
{''.join(table)}
<ul>{''.join(f'<li>{esc(h)}</li>' for h in headline)}</ul>
<h2>{esc(samples_heading)}</h2>
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


# Table 3 of the JDM paper (SD 1.5, one step unless noted): HPS v2, Aesthetic, CLIP score. The coupled
# baseline is DMD2 (CFG inside the real score); HFL on x has no row there (Fig. 6 shows its artefacts)
PAPER_TEXT = {"teacher": (25.50, 5.49, 33.03, "SD 1.5, 25 steps"), "di": (26.35, 5.71, 32.08, "Diff-Instruct"),
              "coupled-cfg": (23.53, 5.82, 30.92, "DMD2"), "hfl": (29.46, 5.89, 33.75, "JDM w/ HFL"),
              "decoupled-cfg": (29.75, 5.90, 33.97, "JDM w/ better CFG")}
TEXT_COLUMNS = [("nfe", "NFE", "{:.0f}", 1), ("latency_ms", "latency ms/img", "{:.1f}", 1),
                ("reward_heldout", "held-out reward (HPS stand-in)", "{:.3f}", 1),
                ("reward_train", "training reward", "{:.3f}", 1),
                ("prompt_accuracy", "prompt acc. (CLIP stand-in)", "{:.2f}", 1),
                ("fid_inception", "FID Inception", "{:.1f}", 1), ("kid_inception", "KID Inception x1e3", "{:.1f}", 1e3),
                ("fid_classifier", "FID classifier", "{:.3f}", 1), ("kid_classifier", "KID classifier x1e3", "{:.2f}", 1e3)]
TEXT_HEADER = ["method"] + [title for _, title, _, _ in TEXT_COLUMNS] + ["paper HPS / Aesthetic / CLIP (SD 1.5)"]


def text_to_image_summary(rows: list[dict]) -> list[str]:
    """Each JDM variant against DI and coupled CFG: held-out reward and prompt accuracy, and whether a
    training-reward gain shows on the held-out reward (reward hacking when it does not)."""
    by = {r["method"]: r for r in rows}
    lines = []
    for method in ("hfl", "decoupled-cfg", "hfl-on-x"):
        for base in ("di", "coupled-cfg"):
            if method in by and base in by:
                m, b = by[method], by[base]
                lines.append(f"{TEXT_LABELS[method]} vs {TEXT_LABELS[base]}: held-out reward "
                             f"{m['reward_heldout'] - b['reward_heldout']:+.3f}{_apart(m, b, 'reward_heldout')}, "
                             f"training reward {m['reward_train'] - b['reward_train']:+.3f}, prompt accuracy "
                             f"{m['prompt_accuracy'] - b['prompt_accuracy']:+.2f}{_apart(m, b, 'prompt_accuracy')}")
    return lines


def _apart(a: dict, b: dict, key: str) -> str:
    """Whether two rows' 95% intervals of `key` are disjoint; "" where either lacks one."""
    order = _order(a, b, key)
    return "" if order is None else " (intervals overlap)" if order == 0 else " (intervals disjoint)"


def write_text_to_image_report(rows: list[dict], samples_dir: Path, out: Path, profile: str) -> None:
    """Table 3 at this profile: table.md and index.html with the rows' sample grids side by side."""
    esc = html.escape
    first = rows[0]
    note = (f"{first['num_samples']} samples per row for the same held-out prompts (the classes in turn); FID "
            f"and KID against {first.get('num_reference', '?')} test images. Rewards are the stand-ins' raw scores "
            f"(real test images: held-out {first['reward_heldout_real']:.3f}, training {first['reward_train_real']:.3f}); "
            f"the held-out reward never gave a gradient. {_intervals_note(rows)} Profile `{profile}`.")
    cells = []
    for r in rows:
        paper = PAPER_TEXT.get(r["method"])
        cells.append([TEXT_LABELS.get(r["method"], r["method"])]
                     + [_cell(r, key, fmt, scale) for key, _, fmt, scale in TEXT_COLUMNS]
                     + [f"{paper[0]:.2f} / {paper[1]:.2f} / {paper[2]:.2f} ({paper[3]})" if paper else "-"])
    headline = text_to_image_summary(rows)
    (out / "table.md").write_text("\n".join([f"# One-step text-to-image ({profile})", "", note, ""]
                                            + _markdown_table(TEXT_HEADER, cells) + [""]
                                            + [f"- {h}" for h in headline]) + "\n")
    grids = ["<table class='grid'>"]
    for r in rows:
        label = TEXT_LABELS.get(r["method"], r["method"])
        src = _sample_link(samples_dir, out, f"{r['method']}-text.png")
        grids.append(f"<tr><th>{esc(label)}</th><td><img src='{esc(src)}' alt='{esc(label)}'></td></tr>")
    grids.append("</table>")
    (out / "index.html").write_text(_page(f"One-step text-to-image ({profile})",
                                          f"JDM: human feedback and decoupled CFG, one step ({profile})", note,
                                          _html_table(TEXT_HEADER, cells), headline,
                                          "Samples (same prompts and classes in every row)", grids))


# --- The headline rows across training seeds (seeds/dvc.yaml) ----------------------------------------------

SEED_KEYS = [column for column in COLUMNS if column[0] not in ("nfe", "latency_ms")]  # what varies with the seed
RATIO_TARGET = 1.3   # issue 18: JDM's mean FID and KID over the conditions at most this times ControlNet-50's
ACCURACY_GAP = 0.05  # ... its prompt accuracy at most this far below
CONSISTENCY_WINS = 3  # ... and its consistency better on at least this many of the four conditions


def seed_claims(rows: list[dict]) -> dict[str, dict]:
    """The headline claims of JDM against ControlNet-50 on one seed's rows: each a value and whether it holds."""
    by = {(r["method"], r["condition"]): r for r in rows}
    conditions = [c for c in dict.fromkeys(r["condition"] for r in rows) if ("jdm", c) in by and ("controlnet-50", c) in by]
    pairs = [(by[("jdm", c)], by[("controlnet-50", c)]) for c in conditions]
    claims = {}
    for key in ("fid_inception", "kid_inception", "fid_classifier", "kid_classifier"):
        if all(key in j and key in o for j, o in pairs):
            mine, theirs = float(np.mean([j[key] for j, _ in pairs])), float(np.mean([o[key] for _, o in pairs]))
            # KID is unbiased, so a mean near 0 can be negative: no ratio then, and the claim is compared
            # without dividing (JDM's mean at most RATIO_TARGET times ControlNet-50's)
            claims[f"{key}_ratio"] = {"value": mine / theirs if theirs > 0 else None, "target": f"<= {RATIO_TARGET}",
                                      "holds": mine <= RATIO_TARGET * theirs}
    gap = float(np.mean([j["prompt_accuracy"] - o["prompt_accuracy"] for j, o in pairs]))
    claims["prompt_accuracy_gap"] = {"value": gap, "target": f">= -{ACCURACY_GAP}", "holds": gap >= -ACCURACY_GAP}
    wins = sum(j["consistency"] < o["consistency"] for j, o in pairs)
    claims["consistency_wins"] = {"value": wins, "target": f">= {CONSISTENCY_WINS} of {len(pairs)}",
                                  "holds": wins >= CONSISTENCY_WINS}
    judged = [(j, o) for j, o in pairs if "consistency_judge" in j and "consistency_judge" in o]
    if judged:  # the same comparison where a held-out judge scores it (hed, depth): does it survive?
        wins = sum(j["consistency_judge"] < o["consistency_judge"] for j, o in judged)
        claims["consistency_judge_wins"] = {"value": wins, "target": f"= {len(judged)} of {len(judged)}",
                                            "holds": wins == len(judged)}
    return claims


def seeds_summary(rows_by_seed: dict[int, list[dict]]) -> dict:
    """Per cell and metric the seeds' values, mean and std (ddof 1); per claim its value on each seed and
    on how many seeds it holds."""
    cells: dict[str, dict] = {}
    for seed, rows in rows_by_seed.items():
        for r in rows:
            cell = cells.setdefault(f"{r['method']}-{r['condition']}", {})
            for key, *_ in SEED_KEYS:
                if key in r:
                    cell.setdefault(key, {"values": []})["values"].append(r[key])
    for cell in cells.values():
        for stats in cell.values():
            v = np.asarray(stats["values"], dtype=float)
            stats["mean"], stats["std"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
    per_seed = {seed: seed_claims(rows) for seed, rows in rows_by_seed.items()}
    claims = {}
    for name in next(iter(per_seed.values())):
        claim = [per_seed[s][name] for s in rows_by_seed]
        claims[name] = {"target": claim[0]["target"], "values": [c["value"] for c in claim],
                        "holds_on": sum(c["holds"] for c in claim), "seeds": len(claim)}
    return {"seeds": list(rows_by_seed), "cells": cells, "claims": claims}


def write_seeds_report(summary: dict, methods: list[str], conditions: list[str], out: Path, profile: str) -> None:
    """reports/seeds/table.md: mean ± std over the seeds per cell, and each claim seed by seed."""
    header = ["method", "condition"] + [title for _, title, _, _ in SEED_KEYS]
    cells = []
    for method in methods:
        for c in conditions:
            cell = summary["cells"].get(f"{method}-{c}", {})
            cells.append([LABELS.get(method, method), c]
                         + [f"{fmt.format(cell[key]['mean'] * scale)} ± {fmt.format(cell[key]['std'] * scale)}"
                            if key in cell else "-" for key, _, fmt, scale in SEED_KEYS])
    seeds = ", ".join(map(str, summary["seeds"]))
    lines = [f"# JDM against ControlNet-50 over {len(summary['seeds'])} training seeds ({profile})", "",
             f"Seeds (offsets from params.yaml's seed): {seeds}. Each cell: mean ± standard deviation over the seeds "
             "of the number `jdm evaluate` writes (each seed's own 95% intervals are in its metrics/eval files).", ""]
    lines += _markdown_table(header, cells) + ["", "Claims (issue 18's targets), seed by seed:", ""]
    for name, claim in summary["claims"].items():
        values = ", ".join("undefined (ControlNet-50's mean <= 0)" if v is None else f"{v:.3f}" if isinstance(v, float)
                           else str(v) for v in claim["values"])
        lines.append(f"- {name} {claim['target']}: {values}; holds on {claim['holds_on']}/{claim['seeds']} seeds")
    (out / "table.md").write_text("\n".join(lines) + "\n")
