"""The DVC stages, one module per family: each stage reads its sections of params.yaml, calls the
library, writes its outputs atomically, and records one MLflow run. `dvc.yaml`, `paper/dvc.yaml` and
`seeds/dvc.yaml` name the same paths; `jdm/cli.py` is the entry they call.

- foundation: data, annotators, judges, condition maps
- teacher: the multi-step teacher
- phases: JDM's warm-up and extension, and the variants trained by them
- baselines: ControlNets trained by denoising (ControlNet-50, Eq. 11)
- evaluation: the teacher's scores, the FID reference, the table's rows
- report: the comparison table, the seeds table
- text_to_image: Table 3 (rewards, guide, students, their evaluation)
"""
