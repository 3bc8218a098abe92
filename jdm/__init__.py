"""Joint Distribution Matching: new controls for a one-step diffusion generator.

The library knows nothing of Prefect or DVC: stages (`jdm.cli`) and flows (`flows/`) call into it.
"""

__version__ = "0.1.0"
