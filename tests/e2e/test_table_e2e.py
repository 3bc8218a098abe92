"""The comparison table in its three places, on the built smoke workspace: `dvc metrics show`, MLflow
runs tagged `method` and `condition` with the same metric names, and `reports/` (Markdown, and an HTML
page a real headless Chromium renders with its table and every image). The paper pipeline runs for
one condition (every baseline and ablation; the whole of it is `make paper`)."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from .conftest import params_file, run

CONDITIONS = ("canny", "hed", "depth", "sr")
ROW_METRICS = {"fid_classifier", "consistency", "nfe", "latency_ms", "prompt_accuracy",
               "num_samples", "num_reference"}
PAPER_METHODS = ("di-controlnet", "denoising", "implicit", "wo-warmup", "wo-modelling")


def render(page, tmp_path, name):
    """Headless Chromium: a screenshot, and the DOM after the load event (the page's own image check)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is not installed: `make install` runs infra/install-system.sh (Debian package chromium)"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / name}"]
    shot = tmp_path / f"{name}.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1400,2400", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    dom = subprocess.run([chromium, *flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return np.asarray(Image.open(shot).convert("RGB")), dom


def check_page(page, tmp_path, name, rows, images):
    shot, dom = render(page, tmp_path, name)
    assert f"{rows} result rows, {images} of {images} images loaded" in dom, re.findall(r'id="status">[^<]*', dom)
    assert shot.shape[0] >= 2000 and shot.shape[1] >= 1200
    gray = shot.mean(axis=2)
    table_lines = (np.abs(shot.astype(int) - 204).max(axis=2) <= 8).sum()  # the table's #ccc borders
    assert table_lines > 2000, table_lines
    # pictures: rows of the screenshot with many dark and many light pixels (samples on white padding)
    picture_rows = ((gray < 100).sum(axis=1) > 40) & ((gray > 200).sum(axis=1) > 40)
    assert picture_rows.sum() > 64, picture_rows.sum()


@pytest.mark.e2e
def test_table_in_dvc_metrics_mlflow_and_report(smoke_workspace, tmp_path):
    import mlflow

    work = smoke_workspace
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], work).stdout)
    files = {path: data["data"] for entry in shown.values() for path, data in entry["data"].items()
             if path.startswith("metrics/eval/") and "data" in data}
    for method in ("jdm", "controlnet-50"):
        for c in CONDITIONS:
            row = files[f"metrics/eval/{method}-{c}.json"]
            assert ROW_METRICS <= set(row) and row["method"] == method and row["condition"] == c
            assert row["num_samples"] == 16 and row["num_reference"] == 16
            assert row["nfe"] == (1 if method == "jdm" else 4)  # smoke samples ControlNet with 4 steps
            assert "fid_inception" not in row and row["fid_classifier"] > 0 and 0 <= row["consistency"] <= 1
            # a held-out judge where the extractor is the network JDM trains against, and only there
            assert ("consistency_judge" in row) == (c in ("hed", "depth")), (method, c)
    # latency is recorded for every row (compared side by side in benchmarks/inference.py, never here)
    assert all(files[f"metrics/eval/{m}-{c}.json"]["latency_ms"] > 0 for m in ("jdm", "controlnet-50") for c in CONDITIONS)

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("jdm").experiment_id], "tags.stage = 'evaluate'")
    pairs = {(r.data.tags["method"], r.data.tags["condition"]) for r in runs}
    assert {(m, c) for m in ("jdm", "controlnet-50") for c in CONDITIONS} <= pairs
    assert all(ROW_METRICS <= set(r.data.metrics) for r in runs)  # the same names line up in the compare view
    # each row's run is nested under its condition's evaluation run
    parents = {r.info.run_id: r for r in client.search_runs([runs[0].info.experiment_id], "tags.stage = 'evaluation'")}
    assert all(parents[r.data.tags["mlflow.parentRunId"]].data.tags["condition"] == r.data.tags["condition"]
               for r in runs)
    assert all(r.data.tags["method"] == "controlnet-50" for r in client.search_runs(
        [runs[0].info.experiment_id], "tags.stage = 'controlnet-50'"))

    report = work / "reports" / "main"
    md = (report / "table.md").read_text()
    assert md.count("| JDM (one step) |") == 4 and "16 samples vs 16 reference" in md and "NCT T1" in md
    # per condition: control maps, teacher without control, JDM, ControlNet
    check_page(report / "index.html", tmp_path, "main", rows=8, images=4 * 4)


def page_text(url, tmp_path, name):
    """What a person reads on a page of a JavaScript app (the MLflow UI) in headless Chromium: the DOM
    once the page's requests have settled, tags and styles stripped."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is not installed: `make install` runs infra/install-system.sh (Debian package chromium)"
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / name}",
                          "--window-size=1600,3000", "--virtual-time-budget=30000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.S)))


@pytest.mark.e2e
def test_the_mlflow_ui_shows_the_evaluation_runs_with_their_tags_and_metrics(smoke_workspace, tmp_path):
    """The MLflow UI as a person opens it, on an MLflow server over the workspace's store: the experiment
    opens as model training, the evaluation runs are found by their stage, and each shows its `method`
    and `condition` tags and the table's metrics, the values of metrics/eval/."""
    import os
    import sys
    import urllib.parse

    import mlflow

    from ..conftest import REPO
    from .conftest import stop, wait_http

    sys.path.insert(0, str(REPO / "infra"))
    from services import free_port

    work, port = smoke_workspace, free_port()
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}"],
                              stdout=open(tmp_path / "mlflow.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        ui = f"http://127.0.0.1:{port}"
        wait_http(f"{ui}/health", server)
        client = mlflow.MlflowClient(ui)
        experiment = client.get_experiment_by_name("jdm").experiment_id
        search = "tags.stage = 'evaluate'"
        runs = client.search_runs([experiment], search)
        assert len(runs) == 2 * len(CONDITIONS)
        listed = page_text(f"{ui}/#/experiments/{experiment}/runs?searchFilter={urllib.parse.quote(search)}", tmp_path, "list")
        # the model-training view (a GenAI experiment would open on an empty traces overview); the
        # evaluate runs are nested under one `evaluation` parent per condition, so those rows are listed
        assert "Training runs" in listed, listed[:2000]
        parents = client.search_runs([experiment], "tags.stage = 'evaluation'")
        assert f"{len(runs) + len(parents)} matching runs" in listed, listed[:3000]
        for c in CONDITIONS:
            assert f"evaluation@{c}" in listed
        for run_ in runs:
            method, condition = run_.data.tags["method"], run_.data.tags["condition"]
            shown = page_text(f"{ui}/#/experiments/{experiment}/runs/{run_.info.run_id}", tmp_path, run_.info.run_id)
            assert f"evaluate-{method}@{condition}" in shown and f"Parent run evaluation@{condition}" in shown
            assert f"method : {method}" in shown and f"condition : {condition}" in shown, shown[:3000]
            row = json.loads((work / f"metrics/eval/{method}-{condition}.json").read_text())
            for metric in ("fid_classifier", "consistency", "prompt_accuracy"):  # as JavaScript prints a float
                assert f" {metric} {row[metric]!r} " in shown or f" {metric} {row[metric]:g} " in shown, (metric, row[metric])
    finally:
        stop(server)


@pytest.mark.e2e
def test_paper_pipeline_for_one_condition(smoke_workspace, tmp_path, monkeypatch, capsys):
    """Through DVC: the DI generator, Eq. 12 and Eq. 11 for hed (the ablations are the same phase code
    with one setting changed; the whole DAG is checked by `dvc dag`). Then the rows and the report."""
    from jdm.cli import main

    work = smoke_workspace
    # the whole paper DAG: every baseline and ablation of every condition feeds the paper's report
    dag = run(["dvc", "dag", "--dot", "paper/dvc.yaml:report-paper"], work).stdout
    for c in CONDITIONS:
        for stage in (f"baseline@implicit-{c}", f"baseline@wo-warmup-{c}", f"denoising@{c}",
                      f"evaluate-baseline@{c}", f"evaluate@{c}", f"controlnet@{c}"):
            assert stage in dag, stage
        # w/o modelling's row of the warm-up condition is its own warm-up, as JDM's is; full range has none
        assert (f"baseline@wo-modelling-{c}" in dag) == (c != "canny"), c
        assert (f"baseline@full-range-{c}" in dag) == (f"evaluate-full-range@{c}" in dag) == (c != "canny"), c
    assert '"paper/dvc.yaml:di"' in dag and '"paper/dvc.yaml:wo-modelling"' in dag

    out = run(["dvc", "repro", "paper/dvc.yaml:baseline@implicit-hed", "paper/dvc.yaml:denoising@hed",
               "paper/dvc.yaml:baseline@full-range-hed"], work, timeout=1200)
    for stage in ("di", "baseline@implicit-hed", "denoising@hed", "baseline@full-range-hed"):
        assert f"Running stage 'paper/dvc.yaml:{stage}'" in out.stdout, stage
    di = json.loads((work / "metrics/baselines/di.json").read_text())
    assert di["method"] == "di" and "consistency" not in di  # no ControlNet, nothing to score
    assert not (work / "models/baselines/di/generator/controlnet").exists()  # a text-to-image student
    implicit = json.loads((work / "metrics/baselines/implicit-hed.json").read_text())
    assert implicit["generator_unchanged"] == 1.0 and implicit["method"] == "implicit"
    full_range = json.loads((work / "metrics/baselines/full-range-hed.json").read_text())
    assert full_range["generator_unchanged"] == 1.0 and full_range["method"] == "full-range"  # on JDM's generator

    # the rows and the report: the stage CLIs' own `main`, in-process (the workspace as working directory)
    monkeypatch.chdir(work)
    methods = ("di-controlnet", "denoising", "implicit", "full-range")
    assert main(["evaluate", "hed", "--methods", ",".join(methods)]) == 0
    for method in methods:
        row = json.loads((work / f"metrics/eval/{method}-hed.json").read_text())
        assert ROW_METRICS <= set(row) and row["nfe"] == 1
    report = tmp_path / "paper-hed"
    assert main(["report", "--methods", ",".join(("jdm", "controlnet-50") + methods), "--conditions", "hed",
                 "--out", str(report)]) == 0
    md = (report / "table.md").read_text()
    assert "implicit ControlNet, plain VSD (Eq. 12)" in md and "JDM vs DI + teacher's ControlNet" in md
    check_page(report / "index.html", tmp_path, "paper", rows=6, images=2 + 6)

    capsys.readouterr()
    assert main(["evaluate", "hed", "--methods", "jdm,controlnet-5"]) == 2
    assert "unknown method(s) 'controlnet-5'; available: jdm, controlnet-50" in capsys.readouterr().err
    # full range has no row on the warm-up's condition: training and scoring it are refused before any
    # work, and the report leaves the cell out (the others' rows stay)
    refused = (["baseline", "full-range", "canny"], ["baseline", "full-range"], ["evaluate", "canny", "--methods", "full-range"])
    for argv in refused:
        assert main(argv) == 2, argv
        assert "full-range has no row on 'canny', the warm-up's condition" in capsys.readouterr().err, argv
    assert not (work / "models/baselines/full-range/controlnet-canny").exists()
    assert not (work / "metrics/eval/full-range-canny.json").exists()
    both = tmp_path / "full-range"
    assert main(["report", "--methods", "jdm,full-range", "--conditions", "canny,hed", "--out", str(both)]) == 0
    table = (both / "table.md").read_text()
    full_range_rows = [line for line in table.splitlines() if line.startswith("| JDM, condition term at every t")]
    assert len(full_range_rows) == 1 and "| hed |" in full_range_rows[0], full_range_rows
    assert "full-range-canny.png" not in (both / "index.html").read_text()

    # which phase each row trains: a variant's own warm-up gives its row of the warm-up condition
    from jdm.config import load_params
    from jdm.variants import variant_phase

    params = load_params(work / "params.yaml")
    assert params.warmup.condition == "canny"
    rows = (("di", "hed"), ("wo-modelling", "canny"), ("wo-modelling", "hed"), ("implicit", "canny"), ("wo-warmup", "canny"))
    assert [variant_phase(m, c, params.warmup.condition) for m, c in rows] == \
        ["warmup", "warmup", "extend", "extend", "extend"]


TEXT_VARIANTS = ("di", "coupled-cfg", "hfl", "decoupled-cfg", "hfl-on-x")
TEXT_METRICS = {"nfe", "latency_ms", "reward_heldout", "reward_train", "prompt_accuracy", "fid_classifier",
                "num_samples", "num_reference"}
TEXT_INTERVALS = {f"{key}_{end}" for key in ("reward_heldout", "reward_train", "prompt_accuracy", "fid_classifier")
                  for end in ("low", "high")}


@pytest.mark.e2e
def test_text_to_image_variants_train_are_scored_and_run_from_a_flow(smoke_workspace, tmp_path, monkeypatch):
    """Table 3 through DVC (with the DI student it starts from): two rewards, the guide, each
    variant, the rows in metrics, MLflow and the report; then one variant from the Prefect flow."""
    import sys

    import mlflow
    import torch
    from safetensors.torch import load_file

    work = smoke_workspace
    out = run(["dvc", "repro", "paper/dvc.yaml:evaluate-text-to-image"], work, timeout=1200)
    for stage in ("reward@train", "reward@heldout", "guide", "evaluate-text-to-image",
                  *(f"text-to-image@{v}" for v in TEXT_VARIANTS)):
        assert f"Running stage 'paper/dvc.yaml:{stage}'" in out.stdout, stage
    status = run(["dvc", "status", "paper/dvc.yaml:evaluate-text-to-image", "--with-deps"], work).stdout
    assert "changed" not in status, status

    rewards = {w: json.loads((work / f"metrics/rewards/{w}.json").read_text()) for w in ("train", "heldout")}
    assert all(0 <= r["preference_accuracy"] <= 1 for r in rewards.values())
    assert rewards["train"]["num_parameters"] != rewards["heldout"]["num_parameters"]  # trained apart, other width
    guide = json.loads((work / "metrics/guide.json").read_text())
    assert guide["steps"] == 4 and guide["heldout_loss_guide"] > 0

    weights = {v: load_file(work / f"models/text-to-image/{v}/generator/unet/diffusion_pytorch_model.safetensors")
               for v in TEXT_VARIANTS}
    di = load_file(work / "models/baselines/di/generator/unet/diffusion_pytorch_model.safetensors")
    for v in TEXT_VARIANTS:
        assert json.loads((work / f"metrics/text-to-image/train-{v}.json").read_text())["steps"] == 2
        assert any(not torch.equal(weights[v][k], di[k]) for k in di), f"{v} did not train"
    for a, b in (("di", "coupled-cfg"), ("di", "hfl"), ("di", "decoupled-cfg"), ("hfl", "hfl-on-x")):
        assert any(not torch.equal(weights[a][k], weights[b][k]) for k in di), f"{a} and {b} trained alike"

    rows = {m: json.loads((work / f"metrics/text-to-image/{m}.json").read_text()) for m in ("teacher",) + TEXT_VARIANTS}
    for method, row in rows.items():
        assert TEXT_METRICS | TEXT_INTERVALS <= set(row) and row["method"] == method and row["condition"] == "text"
        assert row["reward_heldout_low"] <= row["reward_heldout"] <= row["reward_heldout_high"]
        assert row["nfe"] == (4 if method == "teacher" else 1) and row["num_samples"] == 16
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("jdm").experiment_id],
                              "tags.stage = 'evaluate' and tags.condition = 'text'")
    assert {r.data.tags["method"] for r in runs} == set(rows)
    assert all(TEXT_METRICS <= set(r.data.metrics) for r in runs)
    report = work / "reports/text-to-image"
    md = (report / "table.md").read_text()
    assert "JDM w/ decoupled CFG (stronger guide)" in md and "29.75 / 5.90 / 33.97 (JDM w/ better CFG)" in md
    assert md.count("held-out reward") > 1 and "(intervals " in md  # the summary says which gaps are outside them
    check_page(report / "index.html", tmp_path, "text-to-image", rows=6, images=6)

    # the deployment's flow, in-process on a temporary Prefect server: one variant, already trained, scored again
    sys.path.insert(0, str(work / "flows"))
    from jdm_flows import text_to_image
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        state = text_to_image(variant="hfl", workspace=str(work), return_state=True)
        row = state.result()
        assert row["method"] == "hfl" and row["nfe"] == 1
        from prefect import get_client
        from prefect.artifacts import Artifact

        with get_client(sync_client=True) as client:  # the flow run named for what ran; the table published
            assert client.read_flow_run(state.state_details.flow_run_id).name == "text-to-image-hfl"
        assert Artifact.get("jdm-text-to-image-table").data == (report / "table.md").read_text()  # as the flow left it
        with pytest.raises(ValueError, match="unknown text-to-image variant 'hfl2'; available: di, coupled-cfg"):
            text_to_image(variant="hfl2", workspace=str(work))

    # a pretrained guide with a prompt encoder of its own (sd15's way: SD 2.1-base and its OpenCLIP), here
    # a random UNet reading 48-d states and a random 48-d BERT beside MiniLM's tokenizer, from local folders
    from diffusers import UNet2DConditionModel
    from transformers import AutoTokenizer, BertConfig, BertModel

    from jdm.text import minilm_dir

    pipe, encoder = tmp_path / "guide-pipeline", tmp_path / "guide-encoder"
    teacher = UNet2DConditionModel.from_pretrained(work / "models/teacher/unet")
    UNet2DConditionModel.from_config({**teacher.config, "cross_attention_dim": 48}).save_pretrained(pipe / "unet")
    shutil.copytree(work / "models/teacher/scheduler", pipe / "scheduler")
    BertModel(BertConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96)
              ).save_pretrained(encoder)
    AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(encoder)
    pf = params_file(work, "guide.yaml", guide={"pretrained": str(pipe), "text_encoder": {"kind": "minilm",
                                                                                          "path": str(encoder)}})
    run(["jdm", "--params", pf, "guide"], work)
    guide = json.loads((work / "metrics/guide.json").read_text())
    assert guide["steps"] == 0 and guide["heldout_loss_guide"] > 0
    assert json.loads((work / "models/guide/pretrained.json").read_text())["pretrained"] == str(pipe)
    table = load_file(work / "models/guide/embeddings.safetensors")
    assert table["hidden_states"].shape[-1] == 48 and len(table["hidden_states"]) == len(table["attention_mask"])
    run(["jdm", "--params", pf, "text-to-image", "decoupled-cfg"], work)
    own = load_file(work / "models/text-to-image/decoupled-cfg/generator/unet/diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(own[k], weights["decoupled-cfg"][k]) for k in di)  # another guide, another student
