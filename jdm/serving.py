"""The one-step pipeline as an MLflow model (pyfunc), logged and registered by `register_controlnet`, so
that `mlflow.pyfunc.load_model("models:/jdm-controlnet-hed@newest")` loads it anywhere MLflow runs.

Input: a table with a `prompt` (string) and a `control` map (PNG or JPEG bytes) per row; params `seed`
and `controlnet_conditioning_scale`. Output: a table with one `image` (PNG bytes) per row, one network
evaluation each (plus one per ControlNet). The model carries the diffusers folder `jdm export` writes,
and this package's code, so loading it needs no checkout.
"""

from __future__ import annotations

import io
from importlib import metadata
from pathlib import Path

import mlflow
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from .tracking import EXPERIMENT, check_reachable, recording_to, repository_root, tracking_uri

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "prompt"), ColSpec("binary", "control")]),
    outputs=Schema([ColSpec("binary", "image")]),
    params=ParamSchema([ParamSpec("seed", "long", 0), ParamSpec("controlnet_conditioning_scale", "double", 1.0)]),
)
# what the pipeline imports at load and predict time, pinned to the versions that saved it
REQUIREMENTS = ("torch", "diffusers", "transformers", "safetensors", "huggingface_hub", "numpy", "pillow", "pandas",
                "pydantic", "pyyaml")


class OneStepControlModel(mlflow.pyfunc.PythonModel):
    """`context.artifacts["pipeline"]`: the diffusers folder; `model_config["condition"]`: the control the
    `control` column holds."""

    def load_context(self, context) -> None:
        from .pipeline import OneStepControlPipeline

        # the model's own folder; never the hub (a loader outside `jdm` has not set HF_HUB_OFFLINE)
        self.pipe = OneStepControlPipeline.from_pretrained(context.artifacts["pipeline"], local_files_only=True)
        self.condition = context.model_config["condition"]

    def predict(self, context, model_input, params: dict | None = None):
        import pandas as pd
        import torch

        from .pipeline import read_control

        params = params or {}
        channels = self.pipe.controlnets[self.condition].config.conditioning_channels
        controls = torch.cat([read_control(bytes(png), f"in row {i}", channels) for i, png in enumerate(model_input["control"])])
        images = self.pipe(list(model_input["prompt"]), {self.condition: controls},
                           controlnet_conditioning_scale=float(params.get("controlnet_conditioning_scale", 1.0)),
                           generator=torch.Generator().manual_seed(int(params.get("seed", 0)))).images
        return pd.DataFrame({"image": [_png(image) for image in images]})


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def log_pipeline_model(pipe, pipeline_dir: Path, condition: str, name: str = "pipeline"):
    """Log `pipe`, saved at `pipeline_dir`, as a pyfunc model of the active run, with a one-row input
    example; returns MLflow's ModelInfo."""
    import pandas as pd
    from PIL import Image

    from .pipeline import IMAGE_MODES

    mode = IMAGE_MODES.get(pipe.controlnets[condition].config.conditioning_channels)
    # a blank map in the mode the ControlNet reads (a map of more than 4 channels has no PNG: no example)
    example = None if mode is None else pd.DataFrame(
        {"prompt": ["a photo of an ankle boot"], "control": [_png(Image.new(mode, (pipe.image_size,) * 2))]})
    return mlflow.pyfunc.log_model(
        name=name, python_model=OneStepControlModel(), artifacts={"pipeline": str(pipeline_dir)},
        model_config={"condition": condition}, signature=SIGNATURE, input_example=example,
        code_paths=[str(Path(__file__).resolve().parent)],  # the `jdm` package itself, so no checkout is needed
        pip_requirements=[f"{dist}=={metadata.version(dist)}" for dist in REQUIREMENTS])


def registered_name(condition: str) -> str:
    return f"jdm-controlnet-{condition.replace(':', '-')}"


NEWEST = "newest"  # the alias of the newest registered version ('latest' is reserved by MLflow)
# MLflow's name for the version to serve: moves only to a version at least as good as the one it named,
# on the stage's validation maps
CHAMPION = "champion"
QUALITY = ("consistency", "fid_classifier")  # the training run's final validation scores; lower is better


def register_controlnet(condition: str, workspace: Path | None = None) -> tuple[str, str]:
    """Register the ControlNet of the newest finished run that trained `condition` (the `extend` stage,
    or the `warmup` stage for the primary condition) as model `jdm-controlnet-<condition>`: the
    workspace's generator and that ControlNet as one diffusers pipeline with a model card, logged into
    that run as an MLflow pyfunc model and registered from it, so
    `mlflow.pyfunc.load_model("models:/jdm-controlnet-<condition>@newest")` loads it. Alias `newest`
    always moves to it; `champion` only if it is at least as good as the version `champion` named. Registering
    the same run twice returns its existing version."""
    import tempfile

    from mlflow import MlflowClient

    workspace = repository_root(workspace)
    uri = tracking_uri(workspace)
    check_reachable(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        raise LookupError(f"no experiment {EXPERIMENT!r} at {uri}: no stage has run yet")
    runs = [r for r in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"],
                                          max_results=50, filter_string=f"tags.condition = '{condition}' "
                                                                        f"and attributes.status = 'FINISHED'")
            if r.data.tags.get("stage") in ("extend", "warmup")]  # the tag filter has no IN
    if not runs:
        raise LookupError(f"no finished warmup/extend run for condition {condition!r} at {uri}")
    run = runs[0]
    name = registered_name(condition)
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, tags={"condition": condition},
                                       description=f"JDM one-step pipeline with the ControlNet for condition {condition!r} "
                                                   f"(MLflow pyfunc: prompt and control map in, image out)")
    existing = [v for v in client.search_model_versions(f"name = '{name}'") if v.run_id == run.info.run_id]
    if existing:
        version = existing[0]
    else:
        from .pipeline import OneStepControlPipeline

        tags = run.data.tags
        trained_on = (f"Profile `{tags.get('profile', '?')}`; MLflow run `{run.info.run_id}` (stage `{tags['stage']}`, "
                      f"{int(run.data.metrics.get('steps', 0))} iterations). Scores below: the stage's validation maps.")
        scores = {condition: {k: run.data.metrics[k] for k in ("consistency", "fid_classifier", "prompt_accuracy")
                              if k in run.data.metrics}}
        pipe = OneStepControlPipeline.from_workspace(workspace / "models/jdm", [condition])
        with recording_to(uri):
            with tempfile.TemporaryDirectory() as tmp:
                pipe.save_pretrained(Path(tmp) / "pipeline", trained_on=trained_on, metrics=scores)
                with mlflow.start_run(run_id=run.info.run_id):
                    info = log_pipeline_model(pipe, Path(tmp) / "pipeline", condition)
            version = mlflow.register_model(info.model_uri, name, tags={"stage": tags["stage"],
                                                                         "profile": tags.get("profile", "")})
    client.set_registered_model_alias(name, NEWEST, version.version)
    champion = client.get_registered_model(name).aliases.get(CHAMPION)
    if champion is None or _at_least_as_good(run, client.get_run(client.get_model_version(name, champion).run_id)):
        client.set_registered_model_alias(name, CHAMPION, version.version)
    return name, str(version.version)


def _at_least_as_good(new, old) -> bool:
    """No worse on every QUALITY score (validation maps of the training stage); runs that lack one are not compared."""
    a, b = new.data.metrics, old.data.metrics
    return all(k in a and k in b for k in QUALITY) and all(a[k] <= b[k] for k in QUALITY)
