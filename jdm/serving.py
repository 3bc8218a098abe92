"""The one-step pipeline as an MLflow model (pyfunc): what `register_controlnet` logs and registers, so
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

        self.pipe = OneStepControlPipeline.from_pretrained(context.artifacts["pipeline"])
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

